// A CUDA-free stand-in for what the attention_stats kernels use of CUDA, so that their .cu files
// compile with g++ and run on the CPU (tests/test_attention_stats_linear.py): the indexing,
// fragment layouts, masks, synchronisation and statistics of a kernel that has not yet met a GPU
// can be checked against the float64 reference. Never part of the extension build.
//
// Each CUDA thread of a block is a fiber (ucontext); a block's fibers run round-robin, one block at
// a time, switching only at the points where CUDA threads meet: __syncthreads, shuffles, votes,
// mma.sync and ldmatrix. Warp collectives follow the PTX ISA's lane layouts (m16n8k16 A/B/C
// fragments; ldmatrix rows given by lanes 8i..8i+7 for matrix i) and check their preconditions
// (the whole warp arrives, at the same operation; ldmatrix rows 16-byte aligned inside shared
// memory). A collective that not every lane of the warp reaches, or a barrier that not every
// thread reaches, stops the run with "deadlock" instead of hanging. Shared memory starts as 0xff
// bytes (NaN in 16 bits), so a read before a write shows in the results.
//
// Build: g++ -std=c++20 -DRECON_FAST_CUDA_EMULATION -I<dir of stub cuda_runtime.h, cuda_bf16.h,
// cuda_fp16.h that include this file> -x c++ kernel.cu; RECON_FAST_CUDA_EMULATION_MAIN adds a
// main() that runs launch_attention_stats_mma / launch_attention_stats on files (see run_main).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

inline float __uint_as_float(uint32_t v) { float f; std::memcpy(&f, &v, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t v; std::memcpy(&v, &f, 4); return v; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
using std::fmaxf;
using std::fmaf;



using std::min;
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// 16-bit floats: storage and round-to-nearest-even conversions.
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };

namespace emu {
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
inline uint16_t float_to_half_bits(float f) {
  // Round-to-nearest-even through the hardware-independent route: exact via double arithmetic.
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a >= 65520.f) return sign | 0x7c00;  // rounds to infinity
  if (a < 0x1p-25f) return sign;           // rounds to zero
  int e;
  const double m = std::frexp(static_cast<double>(a), &e);  // a = m 2^e, m in [0.5, 1)
  if (e >= -13) {  // normal: 11 significant bits
    const double scaled = std::nearbyint(std::ldexp(m, 11));  // in [1024, 2048]
    int exp_field = e - 1 + 15;
    uint32_t mant = static_cast<uint32_t>(scaled);
    if (mant == 2048) { mant = 1024; ++exp_field; }
    if (exp_field >= 31) return sign | 0x7c00;
    return sign | static_cast<uint16_t>(exp_field << 10) | static_cast<uint16_t>(mant - 1024);
  }
  const double sub = std::nearbyint(std::ldexp(static_cast<double>(a), 24));  // units of 2^-24
  return sign | static_cast<uint16_t>(sub);  // 1024 becomes the smallest normal: still right
}
inline float half_bits_to_float(uint16_t h) {
  const int sign = h >> 15, exp_field = (h >> 10) & 31, mant = h & 1023;
  float v;
  if (exp_field == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp_field == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant + 1024), exp_field - 25);
  return sign ? -v : v;
}
}  // namespace emu

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {{emu::float_to_bf16_bits(a)}, {emu::float_to_bf16_bits(b)}};
}
inline __half2 __floats2half2_rn(float a, float b) {
  return {{emu::float_to_half_bits(a)}, {emu::float_to_half_bits(b)}};
}
inline __nv_bfloat16 __float2bfloat16(float a) { return {emu::float_to_bf16_bits(a)}; }
inline __half __float2half(float a) { return {emu::float_to_half_bits(a)}; }
inline float2 __half22float2(__half2 v) {
  return {emu::half_bits_to_float(v.x.bits), emu::half_bits_to_float(v.y.bits)};
}

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::exit(3);
}

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread;
  bool done = false;
};

struct Block {
  dim3 grid, index, threads;
  int count = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  bool progressed = false;
  std::vector<unsigned char> smem;
  unsigned block_arrived = 0, block_generation = 0;
  unsigned warp_arrived[32] = {}, warp_generation[32] = {};
  uint32_t exchange[32][32][12] = {};  // [warp][lane][word]: a collective's inputs; [11] its kind
  const void* addresses[32][32] = {};
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Fiber& fiber() { return block()->fibers[block()->current]; }

inline void yield() { swapcontext(&fiber().context, &block()->scheduler); }

inline void sync_block() {
  Block& b = *block();
  const unsigned generation = b.block_generation;
  b.progressed = true;
  if (++b.block_arrived == static_cast<unsigned>(b.count)) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  while (b.block_generation == generation) yield();
}

inline int lane_id() { return static_cast<int>(fiber().thread.x % 32); }
inline int warp_id() { return static_cast<int>(fiber().thread.x / 32); }

inline void sync_warp() {
  Block& b = *block();
  const int w = warp_id();
  const unsigned generation = b.warp_generation[w];
  b.progressed = true;
  if (++b.warp_arrived[w] == 32) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    return;
  }
  while (b.warp_generation[w] == generation) yield();
}

// Every collective: each lane writes its inputs, the warp meets, each lane reads what it needs,
// the warp meets again (so that no lane's next collective overwrites inputs still being read).
// `kind` names the operation: lanes that meet at different ones (divergent code) stop the run.
enum Kind : uint32_t { kShuffle = 1, kVote, kMma, kLdmatrix, kLdmatrixTrans };
template <typename Write, typename Read>
inline void collective(Kind kind, Write write, Read read) {
  Block& b = *block();
  uint32_t* mine = b.exchange[warp_id()][lane_id()];
  write(mine);
  mine[11] = kind;
  sync_warp();
  for (int l = 0; l < 32; ++l)
    if (b.exchange[warp_id()][l][11] != kind) fail("the lanes of a warp met at different collectives");
  read(b.exchange[warp_id()]);
  sync_warp();
}

inline uint32_t shuffle_xor_bits(uint32_t v, int lane_mask) {
  uint32_t out = 0;
  collective(kShuffle, [&](uint32_t* mine) { mine[0] = v; },
             [&](uint32_t (*all)[12]) { out = all[lane_id() ^ lane_mask][0]; });
  return out;
}

template <typename T>
inline float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return bf16_bits_to_float(bits);
  else return half_bits_to_float(bits);
}

// D (16x8, float32) += A (16x16) B (16x8), the PTX ISA's m16n8k16 fragment layout.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  float out[4];
  collective(kMma,
      [&](uint32_t* mine) {
        for (int i = 0; i < 4; ++i) mine[i] = a[i];
        mine[4] = b0;
        mine[5] = b1;
      },
      [&](uint32_t (*all)[12]) {
        auto half_of = [](uint32_t word, int k) { return static_cast<uint16_t>(k % 2 ? word >> 16 : word & 0xffffu); };
        auto a_at = [&](int row, int k) {  // lane (row % 8, (k % 8) / 2), register (row >= 8) + 2 (k >= 8)
          const uint32_t word = all[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
          return to_float<T>(half_of(word, k));
        };
        auto b_at = [&](int k, int n) {  // lane (n, (k % 8) / 2), b0 for k < 8, b1 beyond
          const uint32_t word = all[n * 4 + (k % 8) / 2][k >= 8 ? 5 : 4];
          return to_float<T>(half_of(word, k));
        };
        const int g = lane_id() / 4, c = lane_id() % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = g + (i >= 2 ? 8 : 0), n = 2 * c + (i % 2);
          double sum = 0;
          for (int k = 0; k < 16; ++k) sum += static_cast<double>(a_at(row, k)) * b_at(k, n);
          out[i] = static_cast<float>(static_cast<double>(d[i]) + sum);
        }
      });
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix .x4 (.trans): lane 8i + r gives row r of matrix i.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  Block& b = *block();
  const auto* lo = b.smem.data();
  const auto* p = static_cast<const unsigned char*>(row_address);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
  if (p < lo || p + 16 > lo + b.smem.size()) fail("ldmatrix: a row lies outside shared memory");
  collective(trans ? kLdmatrixTrans : kLdmatrix,
      [&](uint32_t*) { b.addresses[warp_id()][lane_id()] = row_address; },
      [&](uint32_t (*)[12]) {
        const void* const* rows = b.addresses[warp_id()];
        const int g = lane_id() / 4, c = lane_id() % 4;
        auto element = [&](int matrix, int row, int col) {
          uint16_t v;
          std::memcpy(&v, static_cast<const unsigned char*>(rows[matrix * 8 + row]) + 2 * col, 2);
          return static_cast<uint32_t>(v);
        };
        for (int i = 0; i < 4; ++i) {
          r[i] = trans ? element(i, 2 * c, g) | element(i, 2 * c + 1, g) << 16
                       : element(i, g, 2 * c) | element(i, g, 2 * c + 1) << 16;
        }
      });
}

inline float exp2_ftz(float x) {
  const float y = std::exp2(x);
  return y < 0x1p-126f ? 0.f : y;
}

inline unsigned char* dynamic_smem() { return block()->smem.data(); }

struct Index {
  const dim3& operator()(int which) const {
    Block& b = *block();
    return which == 0 ? fiber().thread : which == 1 ? b.index : which == 2 ? b.grid : b.threads;
  }
};

template <typename Kernel, typename... Args>
struct LaunchState {
  Kernel kernel;
  std::tuple<Args...> args;
};

template <typename State>
void fiber_entry(unsigned lo, unsigned hi) {
  auto* state = reinterpret_cast<State*>((static_cast<uintptr_t>(hi) << 32) | lo);
  std::apply(state->kernel, state->args);
  fiber().done = true;
  block()->progressed = true;
}

// Runs kernel<<<grid, threads, smem>>>(args...) to completion, one block at a time.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, Args... args) {
  if (threads % 32 != 0 || threads > 1024) return cudaErrorInvalidValue;
  using State = LaunchState<Kernel, Args...>;
  State state{kernel, std::tuple<Args...>(args...)};
  constexpr size_t kStack = 256 * 1024;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.grid = grid;
        b.index = dim3(x, y, z);
        b.threads = dim3(static_cast<unsigned>(threads));
        b.count = threads;
        b.smem.assign(smem_bytes, 0xff);
        b.fibers.resize(threads);
        block() = &b;
        const uintptr_t s = reinterpret_cast<uintptr_t>(&state);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.thread = dim3(static_cast<unsigned>(t));
          f.stack.reset(new char[kStack]);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_entry<State>), 2,
                      static_cast<unsigned>(s & 0xffffffffu), static_cast<unsigned>(s >> 32));
        }
        for (;;) {
          bool all_done = true;
          b.progressed = false;
          for (int t = 0; t < threads; ++t) {
            if (b.fibers[t].done) continue;
            all_done = false;
            b.current = t;
            swapcontext(&b.scheduler, &b.fibers[t].context);
          }
          if (all_done) break;
          if (!b.progressed) fail("deadlock: some threads wait at a barrier or collective the others never reach");
        }
        block() = nullptr;
      }
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (::emu::Index{}(0))
#define blockIdx (::emu::Index{}(1))
#define gridDim (::emu::Index{}(2))
#define blockDim (::emu::Index{}(3))

inline void __syncthreads() { emu::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return __uint_as_float(emu::shuffle_xor_bits(__float_as_uint(v), lane_mask));
}
inline int __shfl_xor_sync(unsigned, int v, int lane_mask) {
  return static_cast<int>(emu::shuffle_xor_bits(static_cast<uint32_t>(v), lane_mask));
}
inline bool __any_sync(unsigned, bool pred) {
  bool any = false;
  emu::collective(emu::kVote, [&](uint32_t* mine) { mine[0] = pred; },
                  [&](uint32_t (*all)[12]) {
                    for (int l = 0; l < 32; ++l) any = any || all[l][0];
                  });
  return any;
}
[[noreturn]] inline void __trap() { emu::fail("__trap"); }

#if defined(RECON_FAST_CUDA_EMULATION_MAIN)
#include "attention_stats_launch.h"

namespace emu {

// main(): `prog KERNEL DIR` with KERNEL one of score, mma, fma and DIR holding problem.txt
// (dtype batch heads kv_heads q_len k_len head_dim scaling causal window softcap sink_tokens
// padding q_strides(3) k_strides(3)), q.bin and k.bin (raw elements, contiguous from the first
// element of the strided view), padding.bin (bool bytes [batch, k_len], when padding = 1).
// Writes out.bin: float32 [batch, heads, q_len, 8].
inline std::vector<unsigned char> read_file(const std::string& path) {
  std::vector<unsigned char> data;
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    std::fclose(f);
  } else {
    fail("cannot read an input file");
  }
  return data;
}

inline int run_main(int argc, char** argv) {
  if (argc != 3) fail("usage: prog score|mma|fma DIR");
  const std::string kernel = argv[1], dir = argv[2];
  FILE* f = std::fopen((dir + "/problem.txt").c_str(), "r");
  if (f == nullptr) fail("no problem.txt");
  recon_fast::AttentionStatsProblem p;
  int dtype, causal, padding;
  long long v[17];
  double scaling, softcap;
  if (std::fscanf(f, "%d %lld %lld %lld %lld %lld %lld %lf %d %lld %lf %lld %d %lld %lld %lld %lld %lld %lld",
                  &dtype, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &scaling, &causal, &v[6], &softcap,
                  &v[7], &padding, &v[8], &v[9], &v[10], &v[11], &v[12], &v[13]) != 19)
    fail("bad problem.txt");
  std::fclose(f);
  p.dtype = static_cast<recon_fast::StatsDtype>(dtype);
  p.batch = v[0]; p.heads = v[1]; p.kv_heads = v[2]; p.q_len = v[3]; p.k_len = v[4]; p.head_dim = v[5];
  p.scaling = static_cast<float>(scaling);
  p.causal = causal != 0;
  p.window = v[6];
  p.softcap = static_cast<float>(softcap);
  p.sink_tokens = v[7];
  p.q_stride_b = v[8]; p.q_stride_h = v[9]; p.q_stride_t = v[10];
  p.k_stride_b = v[11]; p.k_stride_h = v[12]; p.k_stride_t = v[13];
  std::vector<unsigned char> q = read_file(dir + "/q.bin"), k = read_file(dir + "/k.bin"), keep;
  p.q = q.data();
  p.k = k.data();
  if (padding) {
    keep = read_file(dir + "/padding.bin");
    p.key_padding = reinterpret_cast<const bool*>(keep.data());
    p.key_padding_stride_b = p.k_len;
    p.key_padding_stride_t = 1;
  }
  std::vector<float> out(static_cast<size_t>(p.batch * p.heads * p.q_len * recon_fast::kNumAttentionStats), -12345.f);
  p.out = out.data();
  cudaError_t err;
  if (kernel == "score") {
    err = recon_fast::cuda::launch_attention_stats(p, nullptr);
  } else {
    if (!recon_fast::cuda::attention_stats_mma_applies(p)) fail("the linear-case kernel does not apply");
    err = recon_fast::cuda::launch_attention_stats_mma(p, kernel == "mma", nullptr);
  }
  if (err != cudaSuccess) fail("launch returned an error");
  FILE* o = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out.data(), sizeof(float), out.size(), o);
  std::fclose(o);
  return 0;
}

}  // namespace emu

int main(int argc, char** argv) { return emu::run_main(argc, argv); }
#endif
