"""Which argument errors of recon_fast's ops kill the process, and why (for the GPU machine).

Run from the repository root after building the extension (bash benchmarks/run_gpu.sh build):
    PYTHONPATH=$PWD python3 diagnose_check_crash.py [--probe] [--bindings] [--gdb]
Every case runs in its own subprocess, so a SIGSEGV is reported instead of ending the run.
Cases are tagged "num" when the C++ message streams an integer/double into c10::str's
ostringstream (kNumStats, sizes, heads, ...) and "str" when it streams only strings, ScalarType
or Device: on the H100 run exactly the "num" ones are suspected to crash.
--probe     also builds a 5-function extension with load_inline (same flags) and runs c10::str /
            TORCH_CHECK with and without numbers, independent of recon_fast's sources.
--bindings  LD_DEBUG=bindings (LD_BIND_NOW=1): which library each iostream/locale symbol of
            recon_fast's .so, and any symbol bound outside libstdc++/libc/libm/libgcc/torch/cudart/itself,
            comes from (an RTLD_GLOBAL-preloaded CUDA library can interpose; see libcufile below).
--gdb       a host backtrace of the first crashing case (gdb, else cuda-gdb).
"""

import os
import shutil
import subprocess
import sys
import tempfile

CASES = {
    # name: (kind, python expression evaluated after the imports in CHILD)
    "x-empty": ("str", "ts(torch.empty(4, 0), torch.empty(4, 5))"),
    "x-int": ("str", "ts(torch.ones(4, 8, dtype=torch.int32), torch.empty(4, 5))"),
    "out-dtype": ("str", "ts(torch.randn(4, 8), torch.empty(4, 5, dtype=torch.float64))"),
    "stats-dim": ("num", "ts(torch.randn(4, 8), torch.empty(4, 4))"),
    "rows": ("num", "ts(torch.randn(4, 8), torch.empty(3, 5))"),
    "att-dtypes": ("str", "att(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8).half())"),
    "att-int": ("str", "att(torch.ones(1, 4, 4, 8, dtype=torch.int32), torch.ones(1, 4, 4, 8, dtype=torch.int32))"),
    "att-mask-dtype": ("str", "att(q4(), q4(), mask=torch.ones(1, 1, 4, 4, dtype=torch.int64))"),
    "att-gqa": ("num", "att(torch.randn(1, 12, 4, 8), torch.randn(1, 5, 4, 8))"),
    "att-q-dims": ("num", "att(torch.randn(12, 4, 8), q4())"),
    "att-sink": ("num", "att(q4(), q4(), sink=-1)"),
    "att-softcap": ("num", "att(q4(), q4(), softcap=-1.0)"),
    "rows-op": ("num", "torch.ops.recon_fast.token_stats_rows(torch.randn(2, 3, 8), torch.empty(10, 5), 8)"),
}

CHILD = r"""
import glob, sys, torch
try:
    import recon_fast  # loads recon_fast._C the normal way, as the tests do
    from recon_fast.kernels import _library
    assert _library.loaded_from is not None, _library.load_error
except ImportError as exc:  # e.g. orjson missing: load the library alone
    print("(import recon_fast failed: %s; loading the .so directly)" % exc, file=sys.stderr)
    torch.ops.load_library(glob.glob("recon_fast/_C*.so")[0])
ts = torch.ops.recon_fast.token_stats
def q4():
    return torch.randn(1, 4, 4, 8)
def att(q, k, causal=True, window=None, softcap=None, kpm=None, mask=None, sink=4):
    return torch.ops.recon_fast.attention_stats(q, k, 0.35, causal, window, softcap, kpm, mask, sink)
try:
    {expr}
    print("NO ERROR RAISED")
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0][:120])
"""

PROBE_SRC = r"""
#include <torch/extension.h>
#include <string>
std::string str_int() { return c10::str("n=", 5, " d=", 1.5, " l=", int64_t{7}); }
std::string str_text() { return c10::str("s=", std::string("x"), " t=", at::kFloat); }
std::string to_str() { return std::to_string(int64_t{12345}); }
void check_text() { TORCH_CHECK(false, "probe: strings only ", std::string("x"), " ", at::kFloat); }
void check_int() { TORCH_CHECK(false, "probe: an int ", 5, " and a long ", int64_t{7}); }
"""

PROBE_CHILD = r"""
import os, sys, torch
from torch.utils.cpp_extension import load_inline
m = load_inline("recon_probe", cpp_sources=[open(sys.argv[1]).read()],
                functions=["str_int", "str_text", "to_str", "check_text", "check_int"],
                extra_cflags=["-O3", "-std=" + os.environ.get("PROBE_STD", "c++17"), "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=sys.argv[2], verbose=False)
if sys.argv[3] == "build":
    sys.exit(0)
if sys.argv[4] == "1":  # the same process state as the tests: recon_fast._C loaded too
    import glob
    torch.ops.load_library(glob.glob("recon_fast/_C*.so")[0])
f = getattr(m, sys.argv[3])
try:
    print("returned:", f())
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0][:100])
"""


def run(args, env=None, timeout=600):
    """(returncode, stdout + stderr); a child's own result line is its last stdout line."""
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    run.stdout = p.stdout.strip()
    return p.returncode, (p.stdout + p.stderr).strip()


def verdict(rc, out):
    if rc < 0:
        return f"KILLED by signal {-rc}"
    if rc:
        return f"rc={rc}: {out.splitlines()[-1] if out else ''}"
    return run.stdout.splitlines()[-1] if run.stdout else "(no output)"


def main():
    py = sys.executable
    print("python", sys.version.split()[0], "| torch", end=" ")
    print(run([py, "-c", "import torch; print(torch.__version__, torch.version.cuda)"])[1])
    print(run(["c++", "--version"])[1].splitlines()[0])
    crashing, passing = [], []
    for name, (kind, expr) in CASES.items():
        rc, out = run([py, "-X", "faulthandler", "-c", CHILD.format(expr=expr)])
        print(f"  [{kind}] {name:15s} {verdict(rc, out)}")
        if rc < 0:
            crashing.append(name)
            print("      " + "\n      ".join(out.splitlines()[-12:]))
        else:
            passing.append(name)
    print("crashing:", crashing or "none")
    with tempfile.TemporaryDirectory(prefix="recon_diagnose_") as scratch:  # the probe, logs, gdb script
        _deeper(py, crashing, scratch)
    return 1 if crashing else 0  # run_gpu.sh's diagnose step fails while any case crashes


def _deeper(py: str, crashing: list[str], scratch: str) -> None:
    if "--probe" in sys.argv:
        tmp = os.path.join(scratch, "probe")
        os.makedirs(tmp)
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(PROBE_SRC)
        rc, out = run([py, "-c", PROBE_CHILD, src, tmp, "build", "0"], timeout=900)
        print("probe build:", "ok" if rc == 0 else out[-2000:])
        for with_recon in ("0", "1") if rc == 0 else ():
            for fn in ("str_text", "str_int", "to_str", "check_text", "check_int"):
                rc, out = run([py, "-X", "faulthandler", "-c", PROBE_CHILD, src, tmp, fn, with_recon])
                print(f"  probe {fn:10s} (recon_fast loaded: {with_recon}) {verdict(rc, out)}")

    if "--bindings" in sys.argv:
        for name in crashing[:1] or ["stats-dim"]:  # LD_BIND_NOW: every symbol, whichever case runs
            log = os.path.join(scratch, f"ldb_{name}")
            env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=log, LD_BIND_NOW="1")
            run([py, "-c", CHILD.format(expr=CASES[name][1])], env=env)
            usual = ("libstdc++", "libc.so", "libm.so", "libgcc_s", "ld-linux", "libpython",
                     "/torch/lib/lib", "libcudart", "_C.cpython", "libgomp")
            seen = set()
            for path in [p for p in os.listdir(os.path.dirname(log)) if p.startswith(os.path.basename(log))]:
                for line in open(os.path.join(os.path.dirname(log), path), errors="replace"):
                    if "binding file" in line and "recon_fast/_C" in line.split(" to ")[0]:
                        to = line.split(" to ")[1].split(" [")[0]
                        sym = line.split("`", 1)[1].split("'", 1)[0] if "`" in line else line.strip()
                        if not any(u in to for u in usual):
                            seen.add((to, sym))
                        if any(s in line for s in ("ostringstream", "_M_insert", "locale", "ios_base",
                                                   "basic_ios", "num_put", "to_chars", "stringbuf")):
                            seen.add((to, sym))
            print(f"bindings of recon_fast/_C while running {name} (unusual providers and stream/locale symbols):")
            for to, sym in sorted(seen):
                dem = run(["c++filt", sym])[1] if shutil.which("c++filt") else sym
                print(f"    {dem}  ->  {to}")

    if "--gdb" in sys.argv and crashing:
        dbg = shutil.which("gdb") or shutil.which("cuda-gdb")
        if dbg is None:
            print("no gdb/cuda-gdb on PATH")
        else:
            script = os.path.join(scratch, "crash.py")
            with open(script, "w") as f:
                f.write(CHILD.format(expr=CASES[crashing[0]][1]))
            rc, out = run([dbg, "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                           "-ex", "x/8i $pc", "-ex", "info registers", "-ex", "info sharedlibrary",
                           "--args", py, script], timeout=900)
            print(f"{os.path.basename(dbg)} backtrace of {crashing[0]}:\n{out}")


if __name__ == "__main__":
    sys.exit(main())
