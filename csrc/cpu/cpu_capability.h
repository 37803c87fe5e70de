// Which compiled CPU kernel variant runs: the AVX2 one when it was built and the processor has
// AVX2/FMA/F16C, unless ATen's own switch ATEN_CPU_CAPABILITY=default asks for the baseline.
#pragma once

#include <atomic>
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

// Honours ATen's switch so one variable pins both torch and recon_fast to the baseline kernels.
// Read now: getenv walks the whole environment.
inline bool baseline_requested_now() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  return cap != nullptr && std::strcmp(cap, "default") == 0;
}

// The switch as last read: at load, and again by each call of the cpu_kernel op (which tests call
// after changing the variable; ATen itself reads it once). token_stats asks on every call, and a
// host-bound forward makes one per hook: reading the environment each time cost it ~0.1-0.3 us a
// hook (issue 17).
inline std::atomic<bool>& baseline_switch() {
  static std::atomic<bool> requested{baseline_requested_now()};
  return requested;
}

inline bool baseline_requested() { return baseline_switch().load(std::memory_order_relaxed); }

inline bool reread_baseline_request() {
  const bool requested = baseline_requested_now();
  baseline_switch().store(requested, std::memory_order_relaxed);
  return requested;
}

}  // namespace recon_fast::cpu
