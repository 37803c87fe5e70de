// CUDA token_stats of a group of tensors into back-to-back rows of one buffer: a launch covers
// up to kGroupEntries tensors, whose pointers and shapes travel in the kernel's parameters (as
// apex's multi_tensor_apply passes its tensor lists), and each block finds its tensor in that
// table. Tensors are sorted into kinds first (element type, 16-byte alignment, and the lanes or
// threads per row their length asks for), one launch per kind and table, so that every row is
// reduced exactly as the one-tensor launch would (token_stats_reduce.cuh): the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "element_type.h"
#include "token_stats_launch.h"
#include "token_stats_reduce.cuh"

namespace recon_fast::cuda {
namespace {

using namespace reduce;

// Tensors per launch: 16 entries of 168 bytes and their first blocks, 2.8 KB, inside the 4 KB
// of kernel parameters that every CUDA version and architecture torch supports accept (12.1+
// on Volta and later allows 32 KB, which this does not rely on). A decoder layer's outputs
// are 8-13 tensors.
constexpr int kGroupEntries = 16;

// One tensor of a launch: its rows are read through x_rows and written back to back from out.
struct GroupedRows {
  const void* x;
  float* out;
  int64_t rows, dim;
  RowIndexer x_rows;
};

struct GroupedLaunch {
  int count;
  unsigned first_block[kGroupEntries + 1];  // entry e owns blocks [first_block[e], first_block[e + 1])
  GroupedRows entries[kGroupEntries];

  // The entry of a block: a walk over at most kGroupEntries numbers in the parameter space,
  // the same for every thread of the block.
  __device__ __forceinline__ int entry_of(unsigned block) const {
    int e = 0;
    while (e + 1 < count && block >= first_block[e + 1]) ++e;
    return e;
  }
};
static_assert(sizeof(GroupedLaunch) <= 4096, "a launch's table must fit the 4 KB kernel-parameter limit");

// __grid_constant__: the table is read in place from the parameter space (indexed by the
// block's entry), never copied per thread.
template <typename T, bool kVectorized, int kLanes>
__global__ void grouped_by_lane_groups(const __grid_constant__ GroupedLaunch launch) {
  const int e = launch.entry_of(blockIdx.x);
  const GroupedRows& g = launch.entries[e];
  rows_by_lane_groups<T, kVectorized, kLanes>(
      g.rows, g.dim, [&](int64_t r) { return static_cast<const T*>(g.x) + g.x_rows.offset(r); },
      [&](int64_t r) { return g.out + r * kNumStats; }, 1, blockIdx.x - launch.first_block[e]);
}

template <typename T, bool kVectorized>
__global__ void grouped_by_block(const __grid_constant__ GroupedLaunch launch) {
  __shared__ Moments<typename AccOf<T>::type> partial[kMaxBlockThreads / kWarp];
  const int e = launch.entry_of(blockIdx.x);
  const GroupedRows& g = launch.entries[e];
  const int64_t row = blockIdx.x - launch.first_block[e];
  row_by_block<T, kVectorized>(static_cast<const T*>(g.x) + g.x_rows.offset(row), g.dim,
                               g.out + row * kNumStats, 1, partial);
}

// The kind of a tensor's rows: what selects the kernel and its block size.
struct Kind {
  StatsDtype dtype;
  bool vectorized;
  int shape;  // lanes per row (4..32) when dim <= kGroupPerRowMaxDim, else threads per row's block

  bool lane_groups() const { return shape <= kWarp; }
  int key() const { return (static_cast<int>(dtype) * 2 + vectorized) * 2048 + shape; }
};

Kind kind_of(const TokenStatsProblem& p) {
  const int64_t size = element_size(p.dtype);
  const bool vectorized = rows_are_16B_aligned(p, size);
  const int shape = p.dim <= kGroupPerRowMaxDim ? lanes_per_row(p.dim, vectorized ? static_cast<int>(16 / size) : 1)
                                                : block_threads_for(p.dim);
  return {p.dtype, vectorized, shape};
}

int64_t blocks_of(const TokenStatsProblem& p, const Kind& kind) {
  if (!kind.lane_groups()) return p.rows;
  const int64_t rows_per_block = kGroupBlockThreads / kind.shape;
  return (p.rows + rows_per_block - 1) / rows_per_block;
}

template <typename T, bool kVectorized>
void launch_kind(const GroupedLaunch& launch, unsigned blocks, int shape, cudaStream_t stream) {
  switch (shape) {
    case 32: grouped_by_lane_groups<T, kVectorized, 32><<<blocks, kGroupBlockThreads, 0, stream>>>(launch); break;
    case 16: grouped_by_lane_groups<T, kVectorized, 16><<<blocks, kGroupBlockThreads, 0, stream>>>(launch); break;
    case 8: grouped_by_lane_groups<T, kVectorized, 8><<<blocks, kGroupBlockThreads, 0, stream>>>(launch); break;
    case 4: grouped_by_lane_groups<T, kVectorized, 4><<<blocks, kGroupBlockThreads, 0, stream>>>(launch); break;
    default: grouped_by_block<T, kVectorized><<<blocks, shape, 0, stream>>>(launch); break;
  }
}

cudaError_t launch(const GroupedLaunch& table, unsigned blocks, const Kind& kind, cudaStream_t stream) {
  return with_element_type(kind.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (kind.vectorized) {
      launch_kind<T, true>(table, blocks, kind.shape, stream);
    } else {
      launch_kind<T, false>(table, blocks, kind.shape, stream);
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_token_stats_grouped(const TokenStatsProblem* problems, int64_t count, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 0x7fffffffLL;  // grid.x limit
  struct Sorted {
    Kind kind;
    int64_t index;
  };
  std::vector<Sorted> order;
  order.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    if (problems[i].rows == 0) continue;
    const Kind kind = kind_of(problems[i]);
    if (blocks_of(problems[i], kind) > kMaxBlocks) return cudaErrorInvalidValue;
    order.push_back({kind, i});
  }
  std::stable_sort(order.begin(), order.end(),
                   [](const Sorted& a, const Sorted& b) { return a.kind.key() < b.kind.key(); });

  GroupedLaunch table{};
  int64_t blocks = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const TokenStatsProblem& p = problems[order[k].index];
    const Kind& kind = order[k].kind;
    const int64_t own = blocks_of(p, kind);
    if (table.count == kGroupEntries || blocks + own > kMaxBlocks) {  // full: launch what is held
      if (const cudaError_t err = launch(table, static_cast<unsigned>(blocks), kind, stream); err != cudaSuccess) {
        return err;
      }
      table.count = 0;
      blocks = 0;
    }
    table.entries[table.count] = {p.x, p.out, p.rows, p.dim, p.x_rows};
    table.first_block[table.count] = static_cast<unsigned>(blocks);
    blocks += own;
    ++table.count;
    table.first_block[table.count] = static_cast<unsigned>(blocks);
    const bool kind_ends = k + 1 == order.size() || order[k + 1].kind.key() != kind.key();
    if (kind_ends) {
      if (const cudaError_t err = launch(table, static_cast<unsigned>(blocks), kind, stream); err != cudaSuccess) {
        return err;
      }
      table.count = 0;
      blocks = 0;
    }
  }
  return cudaSuccess;
}

}  // namespace recon_fast::cuda
