// Block-sparse causal attention on CPU: one work item per (batch row, query head, query tile),
// online softmax over the selected key tiles, every product a BLAS sgemm straight on the
// query / key / value tensors (no gather, no copy of K or V per query head).
//
// Registered as torch.ops.sparseattn.block_sparse_attention; built at first use by
// sparseattn/backends/cpp.py with g++ against the running torch (see that file).
//
// Shapes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), last dimension contiguous;
// selection (B, Hq, nQ, nK) bool; full (B, nQ, nK) bool (tiles whose every pair is visible);
// key_valid (B, Lk) bool or an empty tensor. Returns (B, Lq, Hq, Dv).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr float kMasked = -1e30f;      // a finite minus infinity: the kernel never sees inf
constexpr float kEmpty = -1e29f;       // a running max below this: nothing visible yet
constexpr int kChunkTiles = 4;         // key tiles per online-softmax step

// Column-major BLAS: C(m x n) = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for x <= 0-ish inputs of a softmax; vectorised by the compiler (no library call).
// Range reduction x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial (rel. error ~2e-7);
// below -87 the result is exactly 0, so masked scores never weigh anything.
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

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  const bool* sel;
  const bool* full;
  const bool* key_valid;  // nullptr: nothing padded
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, bs, nQ, nK;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  int64_t q_offset, kv_offset, window;  // window <= 0: none
  float scale, softcap;                 // softcap <= 0: none
};

struct Segment {
  int64_t key0;  // first key index of a run of consecutive selected tiles
  int64_t width; // keys in the run
  int64_t col;   // first column of the run in the score buffer
};

struct Scratch {
  std::vector<float> scores, acc, row_max, row_sum;
  std::vector<int64_t> tiles;
  std::vector<Segment> segments;
  Scratch(const Problem& p)
      : scores(p.bs * kChunkTiles * p.bs), acc(p.bs * p.Dv), row_max(p.bs), row_sum(p.bs) {
    tiles.reserve(p.nK);
  }
};

// Visible key index range [lo, hi) of query row r of tile i from causality and the window.
inline void visible_range(const Problem& p, int64_t qpos, int64_t* lo, int64_t* hi) {
  *hi = qpos + 1 - p.kv_offset;
  *lo = p.window > 0 ? qpos - p.window + 1 - p.kv_offset : 0;
}

void soft_cap(float* s, int64_t n, float cap) {
  const float inv = 1.0f / cap;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float x = s[c] * inv;
    const float t = exp_approx(-2.0f * std::fabs(x));
    const float th = (1.0f - t) / (1.0f + t);
    s[c] = cap * (x < 0.0f ? -th : th);
  }
}

// Mask the invisible pairs of a partial tile whose columns start at `col` of the score rows.
void mask_tile(const Problem& p, float* scores, int64_t lds, int64_t rows, int64_t q0,
               int64_t key0, int64_t width, int64_t col, int64_t b) {
  const bool* valid = p.key_valid ? p.key_valid + b * p.Lk : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * lds + col;
    int64_t lo, hi;
    visible_range(p, p.q_offset + q0 + r, &lo, &hi);
    lo = std::max<int64_t>(lo - key0, 0);
    hi = std::min<int64_t>(hi - key0, width);
    if (hi <= lo) {
      std::fill(s, s + width, kMasked);
      continue;
    }
    std::fill(s, s + lo, kMasked);
    std::fill(s + hi, s + width, kMasked);
    if (valid) {
      for (int64_t c = lo; c < hi; ++c) {
        if (!valid[key0 + c]) s[c] = kMasked;
      }
    }
  }
}

// One online-softmax step over `width` score columns for every query row of the tile.
void softmax_step(Scratch& w, int64_t rows, int64_t width, int64_t lds, int64_t dv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = w.scores.data() + r * lds;
    float mx = kMasked;
#pragma omp simd reduction(max : mx)
    for (int64_t c = 0; c < width; ++c) mx = s[c] > mx ? s[c] : mx;
    const float m_new = std::max(w.row_max[r], mx);
    if (m_new <= kEmpty) {  // nothing visible to this row yet: contribute nothing
      std::fill(s, s + width, 0.0f);
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < width; ++c) {
      const float e = exp_approx(s[c] - m_new);
      s[c] = e;
      sum += e;
    }
    const float alpha = exp_approx(w.row_max[r] - m_new);
    w.row_sum[r] = w.row_sum[r] * alpha + sum;
    w.row_max[r] = m_new;
    float* o = w.acc.data() + r * dv;
    for (int64_t d = 0; d < dv; ++d) o[d] *= alpha;
  }
}

void run_item(const Problem& p, Scratch& w, int64_t item) {
  const int64_t i = item % p.nQ;
  const int64_t h = (item / p.nQ) % p.Hq;
  const int64_t b = item / (p.nQ * p.Hq);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t q0 = i * p.bs;
  const int64_t rows = std::min(p.bs, p.Lq - q0);
  const int64_t lds = kChunkTiles * p.bs;
  const float* q = p.q + b * p.q_sb + h * p.q_sh + q0 * p.q_sl;
  const float* k = p.k + b * p.k_sb + hk * p.k_sh;
  const float* v = p.v + b * p.v_sb + hk * p.v_sh;
  const bool* sel = p.sel + item * p.nK;
  const bool* full = p.full + (b * p.nQ + i) * p.nK;

  w.tiles.clear();
  for (int64_t j = 0; j < p.nK; ++j)
    if (sel[j]) w.tiles.push_back(j);
  std::fill(w.row_max.begin(), w.row_max.begin() + rows, kMasked);
  std::fill(w.row_sum.begin(), w.row_sum.begin() + rows, 0.0f);
  std::fill(w.acc.begin(), w.acc.begin() + rows * p.Dv, 0.0f);

  const int64_t n_tiles = static_cast<int64_t>(w.tiles.size());
  for (int64_t t0 = 0; t0 < n_tiles; t0 += kChunkTiles) {
    const int64_t t1 = std::min(t0 + kChunkTiles, n_tiles);
    // scores = scale * q k^T over the chunk's tiles, one sgemm per run of consecutive tiles
    w.segments.clear();
    int64_t col = 0;
    for (int64_t t = t0; t < t1;) {
      int64_t u = t + 1;
      while (u < t1 && w.tiles[u] == w.tiles[u - 1] + 1) ++u;
      const int64_t key0 = w.tiles[t] * p.bs;
      const int64_t width = std::min(w.tiles[u - 1] * p.bs + p.bs, p.Lk) - key0;
      gemm('T', 'N', width, rows, p.D, p.scale, k + key0 * p.k_sl, p.k_sl, q, p.q_sl, 0.0f,
           w.scores.data() + col, lds);
      w.segments.push_back({key0, width, col});
      col += width;
      t = u;
    }
    const int64_t width = col;
    if (p.softcap > 0.0f) {
      for (int64_t r = 0; r < rows; ++r) soft_cap(w.scores.data() + r * lds, width, p.softcap);
    }
    // partial tiles: causality, window and padding at token level
    int64_t tile_col = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = w.tiles[t];
      const int64_t key0 = j * p.bs;
      const int64_t tw = std::min(key0 + p.bs, p.Lk) - key0;
      if (!full[j]) mask_tile(p, w.scores.data(), lds, rows, q0, key0, tw, tile_col, b);
      tile_col += tw;
    }
    softmax_step(w, rows, width, lds, p.Dv);
    // acc += p v over the chunk's runs
    for (const Segment& s : w.segments) {
      gemm('N', 'N', p.Dv, rows, s.width, 1.0f, v + s.key0 * p.v_sl, p.v_sl,
           w.scores.data() + s.col, lds, 1.0f, w.acc.data(), p.Dv);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = p.out + ((b * p.Lq + q0 + r) * p.Hq + h) * p.Dv;
    const float* o = w.acc.data() + r * p.Dv;
    const float inv = w.row_sum[r] > 0.0f ? 1.0f / w.row_sum[r] : 0.0f;
    for (int64_t d = 0; d < p.Dv; ++d) dst[d] = o[d] * inv;
  }
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& selection, const at::Tensor& full,
                                  const at::Tensor& key_valid, int64_t block_size,
                                  int64_t q_offset, int64_t kv_offset, int64_t window,
                                  double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "block_sparse_attention runs float32 only");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "the head dimension must be contiguous");
  TORCH_CHECK(selection.scalar_type() == at::kBool && selection.is_contiguous() &&
                  full.scalar_type() == at::kBool && full.is_contiguous(),
              "selection and full must be contiguous bool tensors");
  Problem p{};
  p.B = q.size(0), p.Hq = q.size(1), p.Lq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Lk = k.size(2), p.Dv = v.size(3);
  p.bs = block_size;
  p.nQ = (p.Lq + p.bs - 1) / p.bs, p.nK = (p.Lk + p.bs - 1) / p.bs;
  TORCH_CHECK(p.Hq % p.Hkv == 0, "query heads must be a multiple of key heads");
  TORCH_CHECK(k.stride(2) >= p.D && v.stride(2) >= p.Dv && q.stride(2) >= p.D,
              "rows of q, k, v must not overlap");
  TORCH_CHECK(selection.size(0) == p.B && selection.size(1) == p.Hq &&
                  selection.size(2) == p.nQ && selection.size(3) == p.nK,
              "selection must be (B, Hq, nQ, nK)");
  TORCH_CHECK(full.size(0) == p.B && full.size(1) == p.nQ && full.size(2) == p.nK,
              "full must be (B, nQ, nK)");
  const bool padded = key_valid.numel() > 0;
  if (padded) {
    TORCH_CHECK(key_valid.scalar_type() == at::kBool && key_valid.is_contiguous() &&
                    key_valid.size(0) == p.B && key_valid.size(1) == p.Lk,
                "key_valid must be a contiguous (B, Lk) bool tensor");
  }
  auto out = at::empty({p.B, p.Lq, p.Hq, p.Dv}, q.options());
  p.q = q.data_ptr<float>(), p.k = k.data_ptr<float>(), p.v = v.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.sel = selection.data_ptr<bool>(), p.full = full.data_ptr<bool>();
  p.key_valid = padded ? key_valid.data_ptr<bool>() : nullptr;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.q_offset = q_offset, p.kv_offset = kv_offset, p.window = window;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);

  // most tiles first, handed out one at a time: the causal rows are uneven
  const int64_t items = p.B * p.Hq * p.nQ;
  std::vector<int32_t> cost(items);
  for (int64_t it = 0; it < items; ++it) {
    const bool* row = p.sel + it * p.nK;
    cost[it] = static_cast<int32_t>(std::count(row, row + p.nK, true));
  }
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t c) { return cost[a] > cost[c]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p);
    for (int64_t it = next.fetch_add(1); it < items; it = next.fetch_add(1)) {
      run_item(p, w, order[it]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sparseattn, m) {
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor selection, Tensor full, "
      "Tensor key_valid, int block_size, int q_offset, int kv_offset, int window, float scale, "
      "float softcap) -> Tensor");
  m.impl("block_sparse_attention", c10::DispatchKey::CPU, &block_sparse_attention);
}
