// Numbers and shapes as text for TORCH_CHECK messages.
//
// On the H100 machine (CUDA build, torch 2.11, g++ 13) the argument errors whose message streamed
// a number (an int64_t, kNumStats, a shape, a double) into TORCH_CHECK's std::ostringstream killed
// the process (SIGSEGV), while those that streamed only strings, ScalarType and Device raised
// normally; CPU builds and ASan/UBSan builds raise both. Streaming a number is the only path on
// which the stream consults its locale's num_put facet. Numbers are therefore formatted here,
// without iostreams, so that TORCH_CHECK only receives text: the path that worked there.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace recon_fast {

// "5", "-1", "1.5" (doubles as ostream's default, %g).
template <typename T>
std::string num(T value) {
  static_assert(std::is_arithmetic_v<T>, "num() formats numbers");
  if constexpr (std::is_integral_v<T>) {
    return std::to_string(static_cast<long long>(value));
  } else {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", static_cast<double>(value));
    return text;
  }
}

// "[4, 8]".
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (d) text += ", ";
    text += std::to_string(static_cast<long long>(sizes[d]));
  }
  return text + "]";
}

}  // namespace recon_fast
