// The token_stats problem as plain data: pointers, sizes, strides and dtype, free of torch types,
// so that the CPU kernels (compiled once per instruction set) and the CUDA kernels (compiled by
// nvcc without torch headers) share one description of the work.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RECON_HOST_DEVICE __host__ __device__
#else
#define RECON_HOST_DEVICE
#endif

namespace recon_fast {

// Channels of one output row, in this order. Their names, in index order, must be the rows of
// recon_fast/kernels/stats_tables.py: TOKEN_STATS_TABLE (what each means is written there); the
// library reports them (channel_names(), ops.cpp) and Python serves no op whose names differ.
enum TokenStat : int {
  kStatEnergy = 0,  // L2 norm
  kStatMean = 1,
  kStatStd = 2,  // unbiased
  kStatMin = 3,
  kStatMax = 4,
};
constexpr int kNumStats = 5;
constexpr const char* kTokenStatNames[] = {"energy", "mean", "std", "min", "max"};
static_assert(sizeof(kTokenStatNames) / sizeof(kTokenStatNames[0]) == kNumStats && kStatMax + 1 == kNumStats,
              "token_stats: a channel without its name, or a name without its channel");

enum class StatsDtype : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Leading (row) dimensions after merging the ones that can be merged; real activations have at
// most [batch, tokens, heads], so 8 is generous.
constexpr int kMaxRowDims = 8;

// Maps a flat row number to an element offset for a tensor whose leading dims have arbitrary
// strides: this is what lets `out` be a slice of a larger buffer and `x` a strided view, without
// a copy of either.
struct RowIndexer {
  int ndim = 0;
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};

  RECON_HOST_DEVICE int64_t offset(int64_t row) const {
    if (ndim == 1) return row * strides[0];  // the common case after merging
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return off;
  }
};

struct TokenStatsProblem {
  const void* x = nullptr;  // rows of D elements of `dtype`, last dim contiguous
  StatsDtype dtype = StatsDtype::Float32;
  int64_t rows = 0;
  int64_t dim = 0;  // D, the reduced (last) dimension
  RowIndexer x_rows;
  float* out = nullptr;  // rows of kNumStats floats
  int64_t out_stat_stride = 1;
  RowIndexer out_rows;
};

}  // namespace recon_fast
