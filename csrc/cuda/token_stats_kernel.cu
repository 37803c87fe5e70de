// CUDA token_stats of one tensor: the launch of token_stats_reduce.cuh's row reduction over the
// rows of a TokenStatsProblem (any row strides, in x and in out), sized by the row length.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "element_type.h"
#include "token_stats_launch.h"
#include "token_stats_reduce.cuh"

namespace recon_fast::cuda {
namespace {

using namespace reduce;

template <typename T, bool kVectorized, int kLanes>
__global__ void token_stats_group_per_row(TokenStatsProblem p) {
  rows_by_lane_groups<T, kVectorized, kLanes>(
      p.rows, p.dim, [&](int64_t r) { return static_cast<const T*>(p.x) + p.x_rows.offset(r); },
      [&](int64_t r) { return p.out + p.out_rows.offset(r); }, p.out_stat_stride, blockIdx.x);
}

template <typename T, bool kVectorized>
__global__ void token_stats_block_per_row(TokenStatsProblem p) {
  __shared__ Moments<typename AccOf<T>::type> partial[kMaxBlockThreads / kWarp];
  const int64_t row = blockIdx.x;
  row_by_block<T, kVectorized>(static_cast<const T*>(p.x) + p.x_rows.offset(row), p.dim,
                               p.out + p.out_rows.offset(row), p.out_stat_stride, partial);
}

template <typename T, bool kVectorized, int kLanes>
void launch_groups(const TokenStatsProblem& p, cudaStream_t stream) {
  constexpr int rows_per_block = kGroupBlockThreads / kLanes;
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  token_stats_group_per_row<T, kVectorized, kLanes>
      <<<static_cast<unsigned>(blocks), kGroupBlockThreads, 0, stream>>>(p);
}

template <typename T, bool kVectorized>
cudaError_t launch_typed(const TokenStatsProblem& p, cudaStream_t stream) {
  if (p.dim <= kGroupPerRowMaxDim) {
    switch (lanes_per_row(p.dim, kVectorized ? Pack<T>::N : 1)) {
      case 32: launch_groups<T, kVectorized, 32>(p, stream); break;
      case 16: launch_groups<T, kVectorized, 16>(p, stream); break;
      case 8: launch_groups<T, kVectorized, 8>(p, stream); break;
      default: launch_groups<T, kVectorized, 4>(p, stream); break;
    }
  } else {
    token_stats_block_per_row<T, kVectorized>
        <<<static_cast<unsigned>(p.rows), block_threads_for(p.dim), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dtype(const TokenStatsProblem& p, cudaStream_t stream) {
  return rows_are_16B_aligned(p, sizeof(T)) ? launch_typed<T, true>(p, stream)
                                            : launch_typed<T, false>(p, stream);
}

}  // namespace

cudaError_t launch_token_stats(const TokenStatsProblem& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;  // grid.x limit
  return with_element_type(p.dtype, [&](auto tag) {
    return launch_for_dtype<typename decltype(tag)::type>(p, stream);
  });
}

}  // namespace recon_fast::cuda
