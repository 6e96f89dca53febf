// The lean decode step's two halves of a Llama-style decoder layer, each one call, for one new
// token per row (integration/step.py calls them between which the cache update and the
// attention method run in Python as before).
//
// decode_qkv: x = RMSNorm(h); q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv); RoPE on q and
// k in place (rotate-half form: out[i] = t[i] cos[i] - t[i + D/2] sin[i] for i < D/2, and
// t[i] cos[i] + t[i - D/2] sin[i] above). Returns q (B, Hq, 1, D), k and v (B, Hkv, 1, D).
//
// decode_mlp: h' = h + attn Wo^T (+bo); x = RMSNorm(h'); returns h' + (silu(x Wg^T) * x Wu^T) Wd^T.
//
// A half's weights are registered once (decode_spec: the norm weight, eps and per linear layer
// its weight, re-laid weight, bias, threshold, counters and low-rank factors) and named by the
// integer it returns; each step's call passes that integer, not the ~25 tensors: turning a
// Python list of tensors into the dispatcher's arguments costs ~15 us a call, about what the
// arithmetic of a tiny layer costs. decode_spec_free lets go of an entry (and its tensors).
//
// The projections run at::linear (what F.linear runs: the same BLAS call, the same bits), or,
// under activation sparsity, what the stand-in modules run: TEAL's input thresholds and
// R-Sparse's low-rank part through sparse_input_linear, CATS's MLP through
// sparse_output_linear (sparse_linear.cpp). The norm and RoPE are plain loops with the model's
// arithmetic (the mean of squares in float32, then x * rsqrt(mean + eps), then weight * that),
// so the outputs match the Python step to float32 rounding of the reduction order. What the
// call saves is the Python dispatch of ~40 small ops per layer (5-9 ms a step on SmolLM2's 30
// layers on the 2-core CPU).
//
// Shapes: h (B, 1, E) float32 contiguous; cos, sin (B, 1, D) or (1, 1, D) (the model's
// position embeddings); attn (B, 1, Hq, D) in any strides; biases empty when the layer has none.
//
// Registered as torch.ops.sparseattn.decode_spec / decode_spec_free / decode_qkv / decode_mlp
// (fragments of the library that block_sparse.cpp defines; one shared library built by
// backends/cpp.py).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include "sparse_linear.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

std::optional<at::Tensor> bias_of(const at::Tensor& b) {
  return b.numel() ? std::optional<at::Tensor>(b) : std::nullopt;
}

// out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)), rows of length E.
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t E = x.size(-1), R = x.numel() / E;
  at::Tensor out = at::empty({R, E}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* row = xp + r * E;
    float squares = 0.0f;
    for (int64_t i = 0; i < E; ++i) squares += row[i] * row[i];
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(E) + static_cast<float>(eps));
    float* o = op + r * E;
    for (int64_t i = 0; i < E; ++i) o[i] = wp[i] * (row[i] * scale);
  }
  return out;
}

// RoPE in place on t (B, H * D) with cos, sin rows `row` floats apart (0: one row for all).
void rope_rows(at::Tensor& t, const float* cp, const float* sp, int64_t row, int64_t B,
               int64_t H, int64_t D) {
  const int64_t half = D / 2;
  float* tp = t.data_ptr<float>();
  float first[512];  // head dims up to 1024
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cp + b * row;
    const float* s = sp + b * row;
    for (int64_t h = 0; h < H; ++h) {
      float* x = tp + (b * H + h) * D;
      for (int64_t i = 0; i < half; ++i) first[i] = x[i];
      for (int64_t i = 0; i < half; ++i) x[i] = x[i] * c[i] + (-x[i + half]) * s[i];
      for (int64_t i = half; i < D; ++i) x[i] = x[i] * c[i] + first[i - half] * s[i];
    }
  }
}

void check_rows(const at::Tensor& h, const char* name) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat, name,
              ": float32 CPU tensors only");
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1 && h.is_contiguous(), name,
              ": h must be (B, 1, E) contiguous");
}

// One half's weights: the norm weight and eps, then one entry per linear layer in each list:
// the weight W (out, in); TEAL's re-laid weight wt = W^T (empty: dense); the bias (empty: none);
// the input threshold; the counters (int64, 4) the sparse kernel adds to; R-Sparse's low-rank
// factors V_r (in, r) and (U_r S_r)^T (r, out) for the inputs below the threshold (empty:
// none); CATS's threshold on |silu(gate)| (>= 0: the MLP reads only the rows and columns of
// the active channels; -1: off).
struct Spec {
  at::Tensor norm_w;
  double eps;
  std::vector<at::Tensor> w, wt, b;
  std::vector<double> t;
  std::vector<at::Tensor> counts, down, up;
  double cats;

  // y = x W^T + b, dense or reading only the kept input channels, plus the low-rank part.
  at::Tensor project(const at::Tensor& x, size_t i) const {
    if (wt[i].numel() == 0) return at::linear(x, w[i], bias_of(b[i]));
    at::Tensor y = sparseattn::sparse_input_linear(x, wt[i], b[i], t[i], counts[i]);
    if (down[i].numel() == 0) return y;
    const at::Tensor xc = x.contiguous();
    at::Tensor rest = at::empty_like(xc);  // the inputs the kernel dropped
    const float* xp = xc.data_ptr<float>();
    float* rp = rest.data_ptr<float>();
    const float threshold = static_cast<float>(t[i]);
    for (int64_t j = 0; j < xc.numel(); ++j) rp[j] = std::fabs(xp[j]) >= threshold ? 0.0f : xp[j];
    return y.add_(at::matmul(at::matmul(rest, down[i]), up[i]));
  }
};

std::mutex registry_lock;
std::unordered_map<int64_t, std::shared_ptr<const Spec>> registry;
int64_t next_spec = 1;

int64_t decode_spec(const at::Tensor& norm_w, double eps, at::TensorList w, at::TensorList wt,
                    at::TensorList b, at::ArrayRef<double> t, at::TensorList counts,
                    at::TensorList down, at::TensorList up, double cats) {
  const size_t n = w.size();
  TORCH_CHECK(n == 3 || n == 4, "decode_spec: expected 3 linear layers (q, k, v) or 4 (o, gate, ",
              "up, down), got ", n);
  TORCH_CHECK(wt.size() == n && b.size() == n && t.size() == n && counts.size() == n &&
                  down.size() == n && up.size() == n,
              "decode_spec: expected ", n, " entries in every per-layer list");
  TORCH_CHECK(norm_w.device().is_cpu() && norm_w.scalar_type() == at::kFloat,
              "decode_spec: float32 CPU weights only");
  for (const at::Tensor& m : w)
    TORCH_CHECK(m.dim() == 2 && m.device().is_cpu() && m.scalar_type() == at::kFloat,
                "decode_spec: weights must be 2-D float32 CPU tensors");
  auto spec = std::make_shared<Spec>(Spec{norm_w, eps, w.vec(), wt.vec(), b.vec(), t.vec(),
                                          counts.vec(), down.vec(), up.vec(), cats});
  std::lock_guard<std::mutex> guard(registry_lock);
  const int64_t id = next_spec++;
  registry.emplace(id, std::move(spec));
  return id;
}

void decode_spec_free(int64_t id) {
  std::lock_guard<std::mutex> guard(registry_lock);
  registry.erase(id);
}

std::shared_ptr<const Spec> spec_of(int64_t id, size_t linears, const char* name) {
  std::shared_ptr<const Spec> spec;
  {
    std::lock_guard<std::mutex> guard(registry_lock);
    const auto found = registry.find(id);
    if (found != registry.end()) spec = found->second;
  }
  TORCH_CHECK(spec != nullptr, name, ": no weights registered as ", id,
              " (decode_spec returns the number; decode_spec_free ends it)");
  TORCH_CHECK(spec->w.size() == linears, name, ": spec ", id, " has ", spec->w.size(),
              " linear layers, expected ", linears);
  return spec;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_qkv(const at::Tensor& h, int64_t id,
                                                           const at::Tensor& cos,
                                                           const at::Tensor& sin,
                                                           int64_t head_dim) {
  check_rows(h, "decode_qkv");
  const std::shared_ptr<const Spec> spec = spec_of(id, 3, "decode_qkv");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024, "decode_qkv: head_dim ", head_dim,
              " must be even and at most 1024");
  const int64_t B = h.size(0);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.numel() == s.numel() && (c.numel() == B * head_dim || c.numel() == head_dim),
              "decode_qkv: cos and sin must be (B, 1, head_dim) or (1, 1, head_dim)");
  const int64_t row = c.numel() == head_dim ? 0 : head_dim;  // one row for all: stride 0
  const at::Tensor x = rms_norm_rows(h, spec->norm_w, spec->eps);
  at::Tensor q = spec->project(x, 0);
  at::Tensor k = spec->project(x, 1);
  at::Tensor v = spec->project(x, 2);
  const int64_t Hq = q.size(1) / head_dim, Hkv = k.size(1) / head_dim;
  rope_rows(q, c.data_ptr<float>(), s.data_ptr<float>(), row, B, Hq, head_dim);
  rope_rows(k, c.data_ptr<float>(), s.data_ptr<float>(), row, B, Hkv, head_dim);
  return {q.view({B, Hq, 1, head_dim}), k.view({B, Hkv, 1, head_dim}),
          v.view({B, Hkv, 1, v.size(1) / Hkv})};
}

at::Tensor decode_mlp(const at::Tensor& h, const at::Tensor& attn, int64_t id) {
  check_rows(h, "decode_mlp");
  const std::shared_ptr<const Spec> spec = spec_of(id, 4, "decode_mlp");
  const int64_t B = h.size(0), E = h.size(2);
  at::Tensor mid = spec->project(attn.reshape({B, -1}), 0);  // (B, E)
  float* mp = mid.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  for (int64_t i = 0; i < B * E; ++i) mp[i] = hp[i] + mp[i];  // h' = h + o, in mid
  const at::Tensor x = rms_norm_rows(mid, spec->norm_w, spec->eps);
  at::Tensor hidden;
  if (spec->cats >= 0) {  // CATS: the dense gate decides which up rows and down columns are read
    const at::Tensor gate = at::silu(at::linear(x, spec->w[1], bias_of(spec->b[1])));
    hidden = sparseattn::sparse_output_linear(x, spec->w[2], gate, spec->b[2], spec->cats,
                                              spec->counts[2]);
  } else {
    hidden = at::silu(spec->project(x, 1));
    hidden.mul_(spec->project(x, 2));
  }
  at::Tensor out = spec->project(hidden, 3);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < B * E; ++i) op[i] = mp[i] + op[i];
  return out.view({B, 1, E});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparseattn, m) {
  m.def(
      "decode_spec(Tensor norm_w, float eps, Tensor[] w, Tensor[] wt, Tensor[] b, float[] t, "
      "Tensor[] counts, Tensor[] down, Tensor[] up, float cats) -> int");
  m.def("decode_spec_free(int spec) -> ()");
  m.def("decode_qkv(Tensor h, int spec, Tensor cos, Tensor sin, int head_dim) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("decode_mlp(Tensor h, Tensor attn, int spec) -> Tensor");
  m.impl("decode_spec", &decode_spec);
  m.impl("decode_spec_free", &decode_spec_free);
  m.impl("decode_qkv", c10::DispatchKey::CPU, &decode_qkv);
  m.impl("decode_mlp", c10::DispatchKey::CPU, &decode_mlp);
}
