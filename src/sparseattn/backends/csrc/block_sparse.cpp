// Block-sparse causal attention on CPU: one work item per (batch row, KV head, query tile),
// online softmax over the selected key tiles, every product a BLAS sgemm straight on the
// key / value tensors (no gather, no copy of K or V per query head); the full tiles all query
// heads of the group selected run once for the group's queries stacked.
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

#include <sys/mman.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "softmax_exp.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr float kMasked = -1e30f;      // a finite minus infinity: the kernel never sees inf
constexpr float kEmpty = -1e29f;       // a running max below this: nothing visible yet
constexpr int kChunkTiles = 4;         // key tiles per online-softmax step
constexpr size_t kMinStacked = 2;      // shared full tiles worth stacking the group's queries

// Column-major BLAS: C(m x n) = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

using sparseattn::exp_approx;

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

// Per-worker buffers, sized for the g query heads of one KV head (rows of the stacked pass).
struct Scratch {
  std::vector<float> scores, acc, row_max, row_sum, qbuf;
  std::vector<int64_t> common, tiles, partial;
  std::vector<Segment> segments;
  explicit Scratch(const Problem& p) {
    const int64_t g = p.Hq / p.Hkv;
    scores.resize(g * p.bs * kChunkTiles * p.bs);
    acc.resize(g * p.bs * p.Dv), row_max.resize(g * p.bs), row_sum.resize(g * p.bs);
    qbuf.resize(g > 1 ? g * p.bs * p.D : 0);
    common.reserve(p.nK), tiles.reserve(p.nK), partial.reserve(p.nK);
  }
};

// Key indices [lo, hi) the query at absolute position qpos may see (causality and the window).
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

// One online-softmax step over `width` score columns for score rows [r0, r1), whose running
// max, sum and output rows are those of index `state + r`.
void softmax_step(Scratch& w, int64_t state, int64_t r0, int64_t r1, int64_t width, int64_t lds,
                  int64_t dv) {
  for (int64_t r = r0; r < r1; ++r) {
    float* s = w.scores.data() + r * lds;
    const int64_t x = state + r;
    float mx = kMasked;
#pragma omp simd reduction(max : mx)
    for (int64_t c = 0; c < width; ++c) mx = s[c] > mx ? s[c] : mx;
    const float m_new = std::max(w.row_max[x], mx);
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
    const float alpha = exp_approx(w.row_max[x] - m_new);
    w.row_sum[x] = w.row_sum[x] * alpha + sum;
    w.row_max[x] = m_new;
    float* o = w.acc.data() + x * dv;
#pragma omp simd
    for (int64_t d = 0; d < dv; ++d) o[d] *= alpha;
  }
}

// The query rows one pass runs: one head's query tile, or the g heads' tiles stacked.
struct Row {
  const float* q;  // first query row
  const float* k;
  const float* v;
  int64_t q_ld;    // distance between query rows
  int64_t b, q0, rows, lds;
  int64_t state;   // index of the first row's softmax state and output row
};

// Full tiles, up to kChunkTiles at a time: scores = scale * q k^T with one sgemm per run of
// consecutive tiles, an online-softmax step, then acc += p v per run. No mask is evaluated.
void full_chunk(const Problem& p, Scratch& w, const Row& row, const int64_t* tiles, int64_t n) {
  w.segments.clear();
  int64_t col = 0;
  for (int64_t t = 0; t < n;) {
    int64_t u = t + 1;
    while (u < n && tiles[u] == tiles[u - 1] + 1) ++u;
    const int64_t key0 = tiles[t] * p.bs;
    const int64_t width = std::min(tiles[u - 1] * p.bs + p.bs, p.Lk) - key0;
    gemm('T', 'N', width, row.rows, p.D, p.scale, row.k + key0 * p.k_sl, p.k_sl, row.q, row.q_ld,
         0.0f, w.scores.data() + col, row.lds);
    w.segments.push_back({key0, width, col});
    col += width;
    t = u;
  }
  if (p.softcap > 0.0f) {
    for (int64_t r = 0; r < row.rows; ++r) soft_cap(w.scores.data() + r * row.lds, col, p.softcap);
  }
  softmax_step(w, row.state, 0, row.rows, col, row.lds, p.Dv);
  for (const Segment& s : w.segments) {
    gemm('N', 'N', p.Dv, row.rows, s.width, 1.0f, row.v + s.key0 * p.v_sl, p.v_sl,
         w.scores.data() + s.col, row.lds, 1.0f, w.acc.data() + row.state * p.Dv, p.Dv);
  }
}

// One partial tile (diagonal, window edge, padding, ragged end), in two halves of query rows:
// each half computes only the key columns some of its rows can see (the diagonal's upper
// right quarter is never computed), then masks at token level.
void partial_tile(const Problem& p, Scratch& w, const Row& row, int64_t j) {
  const int64_t key0 = j * p.bs;
  const int64_t tw = std::min(key0 + p.bs, p.Lk) - key0;
  const int64_t half = (row.rows + 1) / 2;
  for (int64_t r0 = 0; r0 < row.rows; r0 += half) {
    const int64_t r1 = std::min(r0 + half, row.rows);
    int64_t c0 = tw, c1 = 0;  // union of the rows' visible columns inside the tile
    for (int64_t r = r0; r < r1; ++r) {
      int64_t lo, hi;
      visible_range(p, p.q_offset + row.q0 + r, &lo, &hi);
      lo = std::max<int64_t>(lo - key0, 0);
      hi = std::min<int64_t>(hi - key0, tw);
      if (lo < hi) c0 = std::min(c0, lo), c1 = std::max(c1, hi);
    }
    if (c1 <= c0) continue;  // no row of this half sees the tile
    const int64_t width = c1 - c0;
    float* scores = w.scores.data() + r0 * row.lds;
    gemm('T', 'N', width, r1 - r0, p.D, p.scale, row.k + (key0 + c0) * p.k_sl, p.k_sl,
         row.q + r0 * row.q_ld, row.q_ld, 0.0f, scores, row.lds);
    if (p.softcap > 0.0f) {
      for (int64_t r = r0; r < r1; ++r) soft_cap(w.scores.data() + r * row.lds, width, p.softcap);
    }
    mask_tile(p, scores, row.lds, r1 - r0, row.q0 + r0, key0 + c0, width, 0, row.b);
    softmax_step(w, row.state, r0, r1, width, row.lds, p.Dv);
    gemm('N', 'N', p.Dv, r1 - r0, width, 1.0f, row.v + (key0 + c0) * p.v_sl, p.v_sl, scores,
         row.lds, 1.0f, w.acc.data() + (row.state + r0) * p.Dv, p.Dv);
  }
}

// dst = o * scale. The output is written once and read by the next layer, not by this
// kernel: streaming stores skip reading each line into cache before writing it.
inline void store_row(float* dst, const float* o, float scale, int64_t n) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && n % 16 == 0) {
    const __m512 f = _mm512_set1_ps(scale);
    for (int64_t d = 0; d < n; d += 16) _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), f));
    return;
  }
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && n % 8 == 0) {
    const __m256 f = _mm256_set1_ps(scale);
    for (int64_t d = 0; d < n; d += 8) _mm256_stream_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), f));
    return;
  }
#endif
  for (int64_t d = 0; d < n; ++d) dst[d] = o[d] * scale;
}

// Ask for rows of a tile ahead of use (into L2): a short row of tiles is otherwise bound by
// the latency of loading its query, key and value tiles.
inline void prefetch_rows(const float* base, int64_t rows, int64_t stride, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const char* line = reinterpret_cast<const char*>(base + r * stride);
    for (int64_t off = 0; off < width * int64_t(sizeof(float)); off += 64) {
      __builtin_prefetch(line + off, 0, 2);
    }
  }
}

void prefetch_tiles(const Problem& p, const float* k, const float* v, const int64_t* tiles,
                    int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t key0 = tiles[t] * p.bs;
    const int64_t rows = std::min(key0 + p.bs, p.Lk) - key0;
    prefetch_rows(k + key0 * p.k_sl, rows, p.k_sl, p.D);
    prefetch_rows(v + key0 * p.v_sl, rows, p.v_sl, p.Dv);
  }
}

// Work items are (batch row, KV head, query tile): the g query heads of a KV head together.
struct Item {
  int64_t b, hk, i, q0, rows;
};

inline Item item_of(const Problem& p, int64_t item) {
  Item it;
  it.i = item % p.nQ;
  it.hk = (item / p.nQ) % p.Hkv;
  it.b = item / (p.nQ * p.Hkv);
  it.q0 = it.i * p.bs;
  it.rows = std::min(p.bs, p.Lq - it.q0);
  return it;
}

inline const float* query_tile(const Problem& p, const Item& it, int64_t h) {
  return p.q + it.b * p.q_sb + h * p.q_sh + it.q0 * p.q_sl;
}

inline const bool* selected(const Problem& p, const Item& it, int64_t h) {
  return p.sel + ((it.b * p.Hq + h) * p.nQ + it.i) * p.nK;
}

// The key / value tiles head h of a work item reads first: its partial tiles (always the
// diagonal) and its last full tiles.
void prefetch_head(const Problem& p, const Item& it, int64_t h) {
  const bool* sel = selected(p, it, h);
  const bool* full = p.full + (it.b * p.nQ + it.i) * p.nK;
  int64_t picked[kChunkTiles + 2], n = 0, n_full = 0;
  for (int64_t j = p.nK - 1; j >= 0 && n < kChunkTiles + 2; --j) {
    if (!sel[j]) continue;
    if (!full[j] || n_full < kChunkTiles) picked[n++] = j;
    n_full += full[j];
  }
  prefetch_tiles(p, p.k + it.b * p.k_sb + it.hk * p.k_sh, p.v + it.b * p.v_sb + it.hk * p.v_sh,
                 picked, n);
}

// The query tiles of a work item, and what its first head reads first.
void prefetch_item(const Problem& p, int64_t item) {
  const Item it = item_of(p, item);
  const int64_t g = p.Hq / p.Hkv, h0 = it.hk * g;
  for (int64_t h = h0; h < h0 + g; ++h) prefetch_rows(query_tile(p, it, h), it.rows, p.q_sl, p.D);
  prefetch_head(p, it, h0);
}

void full_tiles(const Problem& p, Scratch& w, const Row& row, const std::vector<int64_t>& tiles) {
  const int64_t n = static_cast<int64_t>(tiles.size());
  for (int64_t t0 = 0; t0 < n; t0 += kChunkTiles) {
    const int64_t ahead = std::min<int64_t>(kChunkTiles, n - t0 - kChunkTiles);
    if (ahead > 0) prefetch_tiles(p, row.k, row.v, tiles.data() + t0 + kChunkTiles, ahead);
    full_chunk(p, w, row, tiles.data() + t0, std::min<int64_t>(kChunkTiles, n - t0));
  }
}

void run_item(const Problem& p, Scratch& w, int64_t item) {
  const Item it = item_of(p, item);
  const int64_t g = p.Hq / p.Hkv, h0 = it.hk * g;
  Row row;
  row.b = it.b, row.q0 = it.q0, row.lds = kChunkTiles * p.bs;
  row.k = p.k + it.b * p.k_sb + it.hk * p.k_sh;
  row.v = p.v + it.b * p.v_sb + it.hk * p.v_sh;
  const bool* full = p.full + (it.b * p.nQ + it.i) * p.nK;
  std::fill(w.row_max.begin(), w.row_max.begin() + g * it.rows, kMasked);
  std::fill(w.row_sum.begin(), w.row_sum.begin() + g * it.rows, 0.0f);
  std::fill(w.acc.begin(), w.acc.begin() + g * it.rows * p.Dv, 0.0f);

  // full tiles every head of the group selected run once for the g heads stacked (one sgemm
  // of g x 128 query rows per run of tiles): each key / value tile is read once, not g times
  w.common.clear();
  if (g > 1) {
    for (int64_t j = 0; j < p.nK; ++j) {
      bool all = full[j];
      for (int64_t h = h0; all && h < h0 + g; ++h) all = selected(p, it, h)[j];
      if (all) w.common.push_back(j);
    }
    if (w.common.size() < kMinStacked) w.common.clear();
  }
  if (!w.common.empty()) {
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* src = query_tile(p, it, h0 + gi);
      for (int64_t r = 0; r < it.rows; ++r) {
        std::memcpy(w.qbuf.data() + (gi * it.rows + r) * p.D, src + r * p.q_sl,
                    p.D * sizeof(float));
      }
    }
    row.q = w.qbuf.data(), row.q_ld = p.D, row.rows = g * it.rows, row.state = 0;
    full_tiles(p, w, row, w.common);
  }
  // the rest head by head: full tiles of its own, then partial tiles (the diagonal included)
  for (int64_t gi = 0; gi < g; ++gi) {
    const bool* sel = selected(p, it, h0 + gi);
    w.tiles.clear();
    w.partial.clear();
    size_t next_common = 0;
    for (int64_t j = 0; j < p.nK; ++j) {
      const bool shared = next_common < w.common.size() && w.common[next_common] == j;
      next_common += shared;
      if (sel[j] && !shared) (full[j] ? w.tiles : w.partial).push_back(j);
    }
    if (gi + 1 < g) prefetch_head(p, it, h0 + gi + 1);
    row.q = query_tile(p, it, h0 + gi), row.q_ld = p.q_sl, row.rows = it.rows;
    row.state = gi * it.rows;
    full_tiles(p, w, row, w.tiles);
    for (int64_t j : w.partial) partial_tile(p, w, row, j);
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    for (int64_t r = 0; r < it.rows; ++r) {
      const int64_t x = gi * it.rows + r;
      float* dst = p.out + ((it.b * p.Lq + it.q0 + r) * p.Hq + h0 + gi) * p.Dv;
      const float inv = w.row_sum[x] > 0.0f ? 1.0f / w.row_sum[x] : 0.0f;
      store_row(dst, w.acc.data() + x * p.Dv, inv, p.Dv);
    }
  }
}

// A large fresh output is faulted in page by page on first write (at 16K keys that costs as
// much as a few tiles per query tile); asking for 2 MB pages on its aligned interior makes it
// a few dozen faults. Advice only: where the kernel refuses, nothing changes.
void advise_huge_pages(const at::Tensor& out) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t stop = start + out.numel() * sizeof(float);
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = stop & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
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
  advise_huge_pages(out);
  p.q = q.data_ptr<float>(), p.k = k.data_ptr<float>(), p.v = v.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.sel = selection.data_ptr<bool>(), p.full = full.data_ptr<bool>();
  p.key_valid = padded ? key_valid.data_ptr<bool>() : nullptr;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.q_offset = q_offset, p.kv_offset = kv_offset, p.window = window;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);

  // work items handed out one at a time (rows are uneven): the last query tiles first (the
  // longest rows of a causal map)
  const int64_t items = p.B * p.Hkv * p.nQ;
  std::vector<int64_t> order;
  order.reserve(items);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = p.nQ - 1; i >= 0; --i)
      for (int64_t hk = 0; hk < p.Hkv; ++hk) order.push_back((b * p.Hkv + hk) * p.nQ + i);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p);
    // each worker claims its next item before running the current one, to prefetch it
    for (int64_t it = next.fetch_add(1); it < items;) {
      const int64_t following = next.fetch_add(1);
      if (following < items) prefetch_item(p, order[following]);
      run_item(p, w, order[it]);
      it = following;
    }
#if defined(__AVX__)
    _mm_sfence();  // streaming stores visible before the output is read
#endif
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
