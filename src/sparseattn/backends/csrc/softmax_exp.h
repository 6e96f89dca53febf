// The exp of softmax arguments, shared by the prefill (block_sparse.cpp) and decode
// (page_decode.cpp) kernels: one definition, so both weigh keys the same way.
//
// exp(x) for x <= 0-ish inputs; vectorised by the compiler (no library call). Range reduction
// x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial (rel. error ~2e-7); below -87 the result
// is exactly 0, so masked scores never weigh anything.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparseattn {

inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace sparseattn
