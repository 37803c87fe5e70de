// Direct launchers of token_stats_rows and token_stats_rows_grouped: the backends' functions
// that the ops are registered with, picked here by device instead of by the dispatcher. On the
// CPU machine, a [1, 8, 64] write costs 1.3-2.5 us through the op (OpOverload, boxed arguments,
// dispatch-key walk) and 0.5-1 us through this launcher, kernel included; a host-bound forward
// pays that once per hook (pytorch issue 177109: 6.3 us against 1.4 us beside a GPU). The ops
// stay what torch.compile, fake tensors and opcheck see.
#include "token_stats_direct.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "token_stats_rows.h"

namespace recon_fast::direct {
namespace {

// Dispatch keys whose kernels rewrite a tensor before any backend sees it (the Negative and
// ZeroTensor fallbacks materialise it): a tensor with one goes through the op.
bool needs_dispatcher(const at::Tensor& x) { return x.defined() && (x.is_neg() || x._is_zerotensor()); }

#if defined(RECON_FAST_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Where the tensors of a call go, as the dispatcher would choose: CUDA when any is a CUDA tensor
// (whose checks then name one on another device), else CPU. A device with no launcher here
// (no CUDA kernels in this build, or neither CPU nor CUDA) is named in an error.
struct Route {
  bool cuda = false;

  void add(const at::Tensor& t, const char* op) {
    if (!t.defined()) return;  // the op's checks name it
    TORCH_CHECK(t.is_cpu() || (kWithCuda && t.is_cuda()), op, ": no direct launcher for a tensor on ",
                t.device().str(), " in this build; call torch.ops.recon_fast.", op);
    cuda = cuda || t.is_cuda();
  }
};

}  // namespace

void token_stats_rows_into(const at::Tensor& x, at::Tensor& buffer, int64_t row0) {
  if (needs_dispatcher(x)) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("recon_fast::token_stats_rows", "")
                               .typed<void(const at::Tensor&, at::Tensor&, c10::SymInt)>();
    return op.call(x, buffer, c10::SymInt(row0));
  }
  Route route;
  route.add(buffer, "token_stats_rows");
  route.add(x, "token_stats_rows");
#if defined(RECON_FAST_WITH_CUDA)
  if (route.cuda) return cuda::token_stats_rows_cuda(x, buffer, row0);
#endif
  cpu::token_stats_rows_cpu(x, buffer, row0);
}

void token_stats_rows_grouped_into(const std::vector<at::Tensor>& xs, at::Tensor& buffer,
                                   const std::vector<int64_t>& row0s) {
  bool rewrite = false;
  for (const at::Tensor& x : xs) rewrite = rewrite || needs_dispatcher(x);
  if (rewrite) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("recon_fast::token_stats_rows_grouped", "")
                               .typed<void(at::TensorList, at::Tensor&, c10::SymIntArrayRef)>();
    return op.call(xs, buffer, c10::fromIntArrayRefSlow(row0s));
  }
  Route route;
  route.add(buffer, "token_stats_rows_grouped");
  for (const at::Tensor& x : xs) route.add(x, "token_stats_rows_grouped");
#if defined(RECON_FAST_WITH_CUDA)
  if (route.cuda) return cuda::token_stats_rows_grouped_cuda(xs, buffer, row0s);
#endif
  cpu::token_stats_rows_grouped_cpu(xs, buffer, row0s);
}

bool with_cuda() { return kWithCuda; }

}  // namespace recon_fast::direct
