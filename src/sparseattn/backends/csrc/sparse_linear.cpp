// Decode-time linear layers that read only the weights of active channels (activation
// sparsity: CATS arXiv:2404.08763, TEAL arXiv:2408.14690, R-Sparse arXiv:2504.19449).
//
// A few rows (the batch of one decode step) go through y = x W^T. A channel is active when at
// least one row keeps it (|value| >= threshold and value != 0); a kept value enters the product,
// a dropped one is taken as zero. Work and memory reads follow the union of the active channels
// over the rows, so a channel no row keeps is never read.
//
// sparse_input_linear: the input channels are sparse. The weight comes re-laid out once as
// wt = W^T, (in, out) row-major, so input channel j is the contiguous row wt[j]: a skipped
// channel skips out * 4 contiguous bytes. Threads split the output columns; each reads its
// slice of every active row.
//
// sparse_output_linear: the output channels are sparse (CATS's up projection, whose output is
// multiplied by the thresholded gate): h[r, i] = gate[r, i] * (W[i] . x[r] + bias[i]) where row
// r keeps gate channel i, else 0. W is (out, in) row-major as nn.Linear stores it, so an active
// output channel is the contiguous row W[i]. Threads split the active channels.
//
// Both add to counts (int64, 4) in place: active channels (union over rows), channels, kept
// (row, channel) entries, (row, channel) entries.
//
// Registered as torch.ops.sparseattn.sparse_input_linear / sparse_output_linear (fragments of
// the library block_sparse.cpp defines; one shared library built by backends/cpp.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "sparse_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline bool keeps(float value, float threshold) {
  return value != 0.0f && std::fabs(value) >= threshold;
}

void check_common(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  const at::Tensor& counts, const char* name) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, name, ": x is (rows, in) and the weight 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, name,
              ": float32 x and weight");
  TORCH_CHECK(w.is_contiguous(), name, ": the weight must be contiguous");
  TORCH_CHECK(bias.numel() == 0 || bias.scalar_type() == at::kFloat, name, ": float32 bias");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.numel() == 4 && counts.is_contiguous(),
              name, ": counts is a contiguous int64 tensor of 4");
}

void add_counts(const at::Tensor& counts, int64_t active, int64_t channels, int64_t kept,
                int64_t rows) {
  int64_t* c = counts.data_ptr<int64_t>();
  c[0] += active;
  c[1] += channels;
  c[2] += kept;
  c[3] += rows * channels;
}

// Columns [c0, c0 + cw) of y = vals (R, n) @ wt[idx] for every row, into acc (R, width).
// A free function with restrict pointers passed by value: the compiler sees no aliasing
// between the weights, the values and the accumulator (inside the parallel_for lambda it did
// not, and the loop ran ~25% slower).
void input_slice(const float* __restrict wp, const int64_t* __restrict idx,
                 const float* __restrict vals, const float* __restrict bp, int64_t R, int64_t n,
                 int64_t out, int64_t c0, int64_t cw, int64_t width, float* __restrict acc) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < cw; ++c) acc[r * width + c] = bp ? bp[c0 + c] : 0.0f;
  }
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {  // eight weight rows per pass over the accumulator, read once
    const float* w[8];           // for every batch row (measured: 8 rows beat 4; software
    for (int k = 0; k < 8; ++k) w[k] = wp + idx[t + k] * out + c0;  // prefetch did not help)
    for (int64_t r = 0; r < R; ++r) {
      const float* v = vals + r * n + t;
      const float x0 = v[0], x1 = v[1], x2 = v[2], x3 = v[3];
      const float x4 = v[4], x5 = v[5], x6 = v[6], x7 = v[7];
      float* __restrict a = acc + r * width;
#pragma omp simd
      for (int64_t c = 0; c < cw; ++c) {
        a[c] += x0 * w[0][c] + x1 * w[1][c] + x2 * w[2][c] + x3 * w[3][c] + x4 * w[4][c] +
                x5 * w[5][c] + x6 * w[6][c] + x7 * w[7][c];
      }
    }
  }
  for (; t < n; ++t) {
    const float* w0 = wp + idx[t] * out + c0;
    for (int64_t r = 0; r < R; ++r) {
      const float x0 = vals[r * n + t];
      float* __restrict a = acc + r * width;
#pragma omp simd
      for (int64_t c = 0; c < cw; ++c) a[c] += x0 * w0[c];
    }
  }
}

// h[r, idx[a]] = gate * (W[idx[a]] . x[r] + bias) for active channels a in [begin, end) and the
// rows that keep them; four weight rows at once (four streams in flight), each read from memory
// once for every batch row, the head of the rows two groups ahead prefetched into L2.
void output_rows(const float* __restrict wp, const int64_t* __restrict idx,
                 const float* __restrict xp, const float* __restrict gp,
                 const float* __restrict bp, int64_t R, int64_t in, int64_t out,
                 float threshold, int64_t begin, int64_t end, float* __restrict hp) {
  int64_t a = begin;
  for (; a + 4 <= end; a += 4) {
    if (a + 12 <= end) {
      for (int k = 8; k < 12; ++k) {
        const char* head = reinterpret_cast<const char*>(wp + idx[a + k] * in);
        for (int b = 0; b < 256; b += 64) __builtin_prefetch(head + b, 0, 1);
      }
    }
    const float* w0 = wp + idx[a] * in;
    const float* w1 = wp + idx[a + 1] * in;
    const float* w2 = wp + idx[a + 2] * in;
    const float* w3 = wp + idx[a + 3] * in;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = xp + r * in;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t c = 0; c < in; ++c) {
        d0 += w0[c] * xr[c];
        d1 += w1[c] * xr[c];
        d2 += w2[c] * xr[c];
        d3 += w3[c] * xr[c];
      }
      const float dots[4] = {d0, d1, d2, d3};
      for (int k = 0; k < 4; ++k) {
        const int64_t i = idx[a + k];
        const float g = gp[r * out + i];
        if (keeps(g, threshold)) hp[r * out + i] = g * (dots[k] + (bp ? bp[i] : 0.0f));
      }
    }
  }
  for (; a < end; ++a) {
    const int64_t i = idx[a];
    const float* row = wp + i * in;
    for (int64_t r = 0; r < R; ++r) {
      const float g = gp[r * out + i];
      if (!keeps(g, threshold)) continue;
      const float* xr = xp + r * in;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < in; ++c) dot += row[c] * xr[c];
      hp[r * out + i] = g * (dot + (bp ? bp[i] : 0.0f));
    }
  }
}

}  // namespace

namespace sparseattn {

at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias,
                               double threshold_d, const at::Tensor& counts) {
  check_common(x, wt, bias, counts, "sparse_input_linear");
  const at::Tensor xc = x.contiguous();
  const int64_t R = xc.size(0), in = xc.size(1), out = wt.size(1);
  TORCH_CHECK(wt.size(0) == in, "sparse_input_linear: wt must be (in, out) = W^T");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == out, "sparse_input_linear: bias of out");
  const float threshold = static_cast<float>(threshold_d);
  const float* xp = xc.data_ptr<float>();

  // the union of the kept channels, and the rows' kept values packed per active channel
  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(in));
  int64_t kept = 0;
  for (int64_t j = 0; j < in; ++j) {
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      const bool k = keeps(xp[r * in + j], threshold);
      any = any || k;
      kept += k;
    }
    if (any) idx.push_back(j);
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<float> vals(static_cast<size_t>(R * std::max<int64_t>(n, 1)));
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t r = 0; r < R; ++r) {
      const float v = xp[r * in + idx[a]];
      vals[r * n + a] = keeps(v, threshold) ? v : 0.0f;
    }
  }
  add_counts(counts, n, in, kept, R);

  at::Tensor y = at::empty({R, out}, xc.options());
  float* yp = y.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // one contiguous column slice per thread, a multiple of 16 floats (whole cache lines)
  const int64_t width = std::max<int64_t>(16, ((out + threads - 1) / threads + 15) / 16 * 16);
  const int64_t slices = (out + width - 1) / width;

  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(R * width));  // (R, width)
    for (int64_t s = begin; s < end; ++s) {
      const int64_t c0 = s * width, cw = std::min(width, out - c0);
      input_slice(wp, idx.data(), vals.data(), bp, R, n, out, c0, cw, width, acc.data());
      for (int64_t r = 0; r < R; ++r) {
        std::copy(acc.data() + r * width, acc.data() + r * width + cw, yp + r * out + c0);
      }
    }
  });
  return y;
}

at::Tensor sparse_output_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate,
                                const at::Tensor& bias, double threshold_d,
                                const at::Tensor& counts) {
  check_common(x, w, bias, counts, "sparse_output_linear");
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = gate.contiguous();
  const int64_t R = xc.size(0), in = xc.size(1), out = w.size(0);
  TORCH_CHECK(w.size(1) == in, "sparse_output_linear: w must be (out, in)");
  TORCH_CHECK(gc.dim() == 2 && gc.size(0) == R && gc.size(1) == out &&
                  gc.scalar_type() == at::kFloat,
              "sparse_output_linear: gate is float32 (rows, out)");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == out, "sparse_output_linear: bias of out");
  const float threshold = static_cast<float>(threshold_d);
  const float* gp = gc.data_ptr<float>();

  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(out));
  int64_t kept = 0;
  for (int64_t i = 0; i < out; ++i) {
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      const bool k = keeps(gp[r * out + i], threshold);
      any = any || k;
      kept += k;
    }
    if (any) idx.push_back(i);
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  add_counts(counts, n, out, kept, R);

  at::Tensor h = at::zeros({R, out}, xc.options());
  float* hp = h.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(8, (n + threads - 1) / threads);

  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    output_rows(wp, idx.data(), xp, gp, bp, R, in, out, threshold, begin, end, hp);
  });
  return h;
}

}  // namespace sparseattn

TORCH_LIBRARY_FRAGMENT(sparseattn, m) {
  m.def(
      "sparse_input_linear(Tensor x, Tensor wt, Tensor bias, float threshold, "
      "Tensor(a!) counts) -> Tensor");
  m.def(
      "sparse_output_linear(Tensor x, Tensor w, Tensor gate, Tensor bias, float threshold, "
      "Tensor(a!) counts) -> Tensor");
  m.impl("sparse_input_linear", c10::DispatchKey::CPU, &sparseattn::sparse_input_linear);
  m.impl("sparse_output_linear", c10::DispatchKey::CPU, &sparseattn::sparse_output_linear);
}
