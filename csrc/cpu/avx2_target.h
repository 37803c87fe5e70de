// Included first by the *_avx2.cpp kernels: compiles the rest of the translation unit for
// AVX2 + FMA + F16C, chosen at run time when the processor has them.
//
// setuptools gives every source of an extension the same flags, so instead of -mavx2 -mfma the
// instruction set is enabled with a target pragma before any other header. GCC does not define
// the ISA macros for a pragma, and ATen's vec256 headers and sleef.h test them, so they are
// defined here by hand: exactly the macros -mavx2 -mfma would define.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define RECON_FAST_AVX2_TARGET 1
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
// GCC warns that 256-bit vectors change the calling convention; every function in such an object
// is compiled for AVX2 and the only ways in are plain-pointer entry points.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
