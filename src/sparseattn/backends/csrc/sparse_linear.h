// The activation-sparse linear layers of sparse_linear.cpp, for the other kernels of the
// library (decode_step.cpp calls them inside its fused decode halves).
#pragma once

#include <ATen/core/Tensor.h>

namespace sparseattn {

// y = x_kept wt + bias over wt = W^T (in, out); x (R, in); adds to counts (int64, 4).
at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias,
                               double threshold, const at::Tensor& counts);

// h = gate_kept * (x W^T + bias), only the output channels some row keeps; W (out, in).
at::Tensor sparse_output_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,
                                const at::Tensor& bias, double threshold,
                                const at::Tensor& counts);

}  // namespace sparseattn
