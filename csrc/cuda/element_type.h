// The CUDA element type behind a StatsDtype, for the kernels' host-side launchers: one switch
// instead of one per op.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../token_stats_problem.h"

namespace recon_fast::cuda {

template <typename T>
struct ElementType {
  using type = T;
};

// Returns launch(ElementType<T>{}) for the element type T of `dtype`; launch reads the type as
// `typename decltype(tag)::type`.
template <typename Launch>
cudaError_t with_element_type(StatsDtype dtype, Launch&& launch) {
  switch (dtype) {
    case StatsDtype::Float32: return launch(ElementType<float>{});
    case StatsDtype::Float64: return launch(ElementType<double>{});
    case StatsDtype::Float16: return launch(ElementType<__half>{});
    case StatsDtype::BFloat16: return launch(ElementType<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace recon_fast::cuda
