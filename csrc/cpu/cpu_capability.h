// Which compiled CPU kernel variant runs: the AVX2 one when it was built and the processor has
// AVX2/FMA/F16C, unless ATen's own switch ATEN_CPU_CAPABILITY=default asks for the baseline.
#pragma once

#include <cstdlib>
#include <cstring>

namespace recon_fast::cpu {

inline bool processor_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// Honours ATen's switch so one variable pins both torch and recon_fast to the baseline kernels;
// read on every call so tests can exercise both.
inline bool baseline_requested() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  return cap != nullptr && std::strcmp(cap, "default") == 0;
}

}  // namespace recon_fast::cpu
