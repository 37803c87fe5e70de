// token_stats CPU kernel compiled for AVX2 + FMA, chosen at run time when the processor has them.
//
// setuptools gives every source of an extension the same flags, so instead of -mavx2 -mfma this
// file enables the instruction set with a target pragma before any header. GCC does not define
// the ISA macros for a pragma, and ATen's vec256 headers and sleef.h test them, so they are
// defined here by hand: exactly the macros -mavx2 -mfma would define.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// GCC warns that 256-bit vectors change the calling convention; every function in this object is
// compiled for AVX2 and the only way in is the plain-pointer entry point below.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "token_stats_kernel.h"

#include "token_stats_cpu.h"

namespace recon_fast::cpu {
bool avx2_kernel_compiled() { return true; }
void token_stats_rows_avx2(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  AVX2::token_stats_rows(p, begin, end);
}
}  // namespace recon_fast::cpu

#else  // not x86-64 GCC/Clang: the default kernel serves alone

#include "token_stats_cpu.h"

namespace recon_fast::cpu {
bool avx2_kernel_compiled() { return false; }
void token_stats_rows_avx2(const TokenStatsProblem& p, int64_t begin, int64_t end) {
  token_stats_rows_default(p, begin, end);
}
}  // namespace recon_fast::cpu
#endif
