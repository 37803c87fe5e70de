// recon_fast._C.token_stats_rows(x, buffer, row0): token_stats into rows of a tracer's arena
// chunk, without building the slice in Python (see token_stats_rows.cpp).
#pragma once

#include <Python.h>

namespace recon_fast {

PyObject* token_stats_rows(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace recon_fast
