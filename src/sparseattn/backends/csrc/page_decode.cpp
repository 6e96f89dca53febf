// Decode attention over selected pages of the KV cache, read in place (no gather, no copy):
// one query position per row, the g query heads of a KV head as the rows of one work item,
// online softmax over the chosen pages and then a contiguous tail of slots (the page being
// written). Work items split a (row, KV head)'s pages into chunks when there are fewer items
// than threads; chunks merge by log-sum-exp.
//
// Registered as torch.ops.sparseattn.page_decode_attention (a fragment of the library that
// block_sparse.cpp defines; both are built into one shared library by backends/cpp.py).
//
// Shapes: q (B, Hkv, g, D) contiguous; k (B, Hkv, S, D), v (B, Hkv, S, Dv) with the last
// dimension contiguous (any other strides: a view of the cache buffer); pages (B, Hkv, n)
// int64 page indices of page_size slots each; slots [tail_start, tail_stop) read after them.
// Returns (B, Hkv, g, Dv) float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "softmax_exp.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 16;  // query heads per KV head handled by one item
constexpr float kNone = -1e30f;

using sparseattn::exp_approx;

struct Partial {
  float max[kMaxRows];
  float sum[kMaxRows];
};

// Turns row r's `count` scores into exp(score - new max) in place, folds their sum into the
// running state and returns the factor the row's accumulated values must be scaled by.
inline float softmax_block(float* sc, int count, Partial& part, int r) {
  float top = part.max[r];
  for (int s = 0; s < count; ++s) top = std::max(top, sc[s]);
  const float correction = exp_approx(part.max[r] - top);
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int s = 0; s < count; ++s) {
    sc[s] = exp_approx(sc[s] - top);
    total += sc[s];
  }
  part.sum[r] = part.sum[r] * correction + total;
  part.max[r] = top;
  return correction;
}

// Folds `count` consecutive slots starting at key row `first` into the running state: the
// portable form (any D, Dv), vectorised by the compiler.
inline void fold_generic(const float* q, int g, int D, int Dv, const float* k, int64_t k_stride,
                         const float* v, int64_t v_stride, int64_t first, int count, float scale,
                         Partial& part, float* acc, float* scores) {
  // four keys at a time: four independent accumulators per row, so the FMA latency of one
  // dot product does not serialise the loop (one key at a time ran at half the memory rate)
  int s = 0;
  for (; s + 4 <= count; s += 4) {
    const float* k0 = k + (first + s) * k_stride;
    const float* k1 = k0 + k_stride;
    const float* k2 = k1 + k_stride;
    const float* k3 = k2 + k_stride;
    for (int r = 0; r < g; ++r) {
      const float* row = q + r * D;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int d = 0; d < D; ++d) {
        const float x = row[d];
        d0 += x * k0[d];
        d1 += x * k1[d];
        d2 += x * k2[d];
        d3 += x * k3[d];
      }
      float* sc = scores + r * count + s;
      sc[0] = d0 * scale;
      sc[1] = d1 * scale;
      sc[2] = d2 * scale;
      sc[3] = d3 * scale;
    }
  }
  for (; s < count; ++s) {
    const float* key = k + (first + s) * k_stride;
    for (int r = 0; r < g; ++r) {
      const float* row = q + r * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int d = 0; d < D; ++d) dot += row[d] * key[d];
      scores[r * count + s] = dot * scale;
    }
  }
  for (int r = 0; r < g; ++r) {
    const float correction = softmax_block(scores + r * count, count, part, r);
    float* out = acc + r * Dv;
#pragma omp simd
    for (int d = 0; d < Dv; ++d) out[d] *= correction;
    for (int s = 0; s < count; ++s) {
      const float w = scores[r * count + s];
      const float* value = v + (first + s) * v_stride;
#pragma omp simd
      for (int d = 0; d < Dv; ++d) out[d] += w * value[d];
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// The sum of each of eight vectors, as one vector (lane j: the sum of a[j]'s lanes).
inline __m256 sums_of_eight(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]);  // a0 pairs, a1 pairs (per 128-bit half)
  const __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);  // per half: a0 a1 a2 a3 partial sums
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20);  // lower halves
  const __m256 high = _mm256_permute2f128_ps(s0123, s4567, 0x31);  // upper halves
  return _mm256_add_ps(low, high);
}

constexpr int kAhead = 32;  // rows of keys / values fetched ahead of their use

// Asks for rows [first, last) of a (rows, width) float array with row stride `stride`: one
// stream of key or value rows per thread does not keep enough reads in flight on its own.
inline void prefetch_rows(const float* base, int64_t stride, int first, int last, int width) {
  for (int s = first; s < last; ++s)
    for (int d = 0; d < width; d += 16)
      _mm_prefetch(reinterpret_cast<const char*>(base + s * stride + d), _MM_HINT_T0);
}

// The same fold with AVX2 + FMA for D and Dv multiples of 8: scores eight keys at a time per
// query row (the keys of a block stay in L1 across the group's rows), and the weighted sum of
// values with up to three rows' accumulators for 32 value lanes held in registers across the
// whole block, so each value row is loaded once per three query rows and nothing is stored
// per key. Memory-bound on the keys and values it reads, where the generic form was bound by
// its per-key stores and horizontal sums.
inline void fold_avx2(const float* q, int g, int D, int Dv, const float* k, int64_t k_stride,
                      const float* v, int64_t v_stride, int64_t first, int count, float scale,
                      Partial& part, float* acc, float* scores) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const float* kb = k + first * k_stride;
  for (int r = 0; r < g; ++r) {
    const float* row = q + r * D;
    float* sc = scores + r * count;
    int s = 0;
    for (; s + 8 <= count; s += 8) {
      if (r == 0) {
        prefetch_rows(kb, k_stride, s + kAhead, std::min(count, s + 8 + kAhead), D);
        prefetch_rows(v + first * v_stride, v_stride, s, s + 8, Dv);  // for the value pass
      }
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) {
        const __m256 x = _mm256_loadu_ps(row + d);
        for (int j = 0; j < 8; ++j)
          a[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(kb + (s + j) * k_stride + d), a[j]);
      }
      _mm256_storeu_ps(sc + s, _mm256_mul_ps(sums_of_eight(a), vscale));
    }
    for (; s < count; ++s) {
      const float* key = kb + s * k_stride;
      __m256 a = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(row + d), _mm256_loadu_ps(key + d), a);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_hadd_ps(h, h);
      h = _mm_hadd_ps(h, h);
      sc[s] = _mm_cvtss_f32(h) * scale;
    }
  }
  float correction[kMaxRows];
  for (int r = 0; r < g; ++r) correction[r] = softmax_block(scores + r * count, count, part, r);
  const float* vb = v + first * v_stride;
  for (int r0 = 0; r0 < g; r0 += 3) {
    const int rows = std::min(3, g - r0);
    for (int d0 = 0; d0 < Dv; d0 += 32) {
      const int lanes = std::min(4, (Dv - d0) / 8);  // 8-float vectors in this tile
      __m256 o[3][4];
      for (int r = 0; r < rows; ++r) {
        const __m256 c = _mm256_set1_ps(correction[r0 + r]);
        for (int t = 0; t < lanes; ++t)
          o[r][t] = _mm256_mul_ps(_mm256_loadu_ps(acc + (r0 + r) * Dv + d0 + 8 * t), c);
      }
      for (int s = 0; s < count; ++s) {
        const float* value = vb + s * v_stride + d0;
        __m256 x[4];
        for (int t = 0; t < lanes; ++t) x[t] = _mm256_loadu_ps(value + 8 * t);
        for (int r = 0; r < rows; ++r) {
          const __m256 w = _mm256_broadcast_ss(scores + (r0 + r) * count + s);
          for (int t = 0; t < lanes; ++t) o[r][t] = _mm256_fmadd_ps(w, x[t], o[r][t]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int t = 0; t < lanes; ++t)
          _mm256_storeu_ps(acc + (r0 + r) * Dv + d0 + 8 * t, o[r][t]);
    }
  }
}
#endif

inline void fold(const float* q, int g, int D, int Dv, const float* k, int64_t k_stride,
                 const float* v, int64_t v_stride, int64_t first, int count, float scale,
                 Partial& part, float* acc, float* scores) {
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0 && Dv % 8 == 0) {
    fold_avx2(q, g, D, Dv, k, k_stride, v, v_stride, first, count, scale, part, acc, scores);
    return;
  }
#endif
  fold_generic(q, g, D, Dv, k, k_stride, v, v_stride, first, count, scale, part, acc, scores);
}

}  // namespace

at::Tensor page_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pages, int64_t page_size, int64_t tail_start,
                                 int64_t tail_stop, double scale_d) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && pages.dim() == 3,
              "page_decode_attention: q, k, v are 4-D and pages 3-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && pages.scalar_type() == at::kLong,
              "page_decode_attention: float32 q/k/v and int64 pages");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "the last dimension of k, v is contiguous");
  const at::Tensor qc = q.contiguous();
  const at::Tensor pc = pages.contiguous();
  const int64_t B = q.size(0), H = q.size(1), S = k.size(2), n = pages.size(2);
  const int g = static_cast<int>(q.size(2)), D = static_cast<int>(q.size(3));
  const int Dv = static_cast<int>(v.size(3));
  TORCH_CHECK(g <= kMaxRows, "page_decode_attention: at most 16 query heads per KV head");
  TORCH_CHECK(tail_start <= tail_stop && tail_stop <= S, "tail outside the held slots");
  const int P = static_cast<int>(page_size);
  const float scale = static_cast<float>(scale_d);
  // blocks: the n pages, then the tail in pieces of at most P slots
  const int64_t tail_blocks = (tail_stop - tail_start + P - 1) / P;
  const int64_t blocks = n + tail_blocks;
  const int64_t pairs = B * H;
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::max<int64_t>(1, (2 * threads + pairs - 1) / pairs);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, blocks));
  const int64_t per_split = (blocks + splits - 1) / splits;

  std::vector<float> acc(static_cast<size_t>(pairs * splits * g * Dv), 0.0f);
  std::vector<Partial> parts(static_cast<size_t>(pairs * splits));
  const float* qp = qc.data_ptr<float>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();

  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(g * P));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / splits, split = item % splits;
      const int64_t b = pair / H, h = pair % H;
      const float* qrow = qp + pair * g * D;
      const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      Partial& part = parts[item];
      for (int r = 0; r < g; ++r) part.max[r] = kNone, part.sum[r] = 0.0f;
      float* out = acc.data() + item * g * Dv;
      const int64_t first = split * per_split, last = std::min(blocks, first + per_split);
      for (int64_t block = first; block < last; ++block) {
        int64_t slot;
        int count;
        if (block < n) {
          slot = pp[pair * n + block] * P;
          count = static_cast<int>(std::min<int64_t>(P, S - slot));
        } else {
          slot = tail_start + (block - n) * P;
          count = static_cast<int>(std::min<int64_t>(P, tail_stop - slot));
        }
        if (count > 0)
          fold(qrow, g, D, Dv, kh, k.stride(2), vh, v.stride(2), slot, count, scale, part, out,
               scores.data());
      }
    }
  });

  at::Tensor result = at::empty({B, H, g, Dv}, q.options());
  float* rp = result.data_ptr<float>();
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      for (int r = 0; r < g; ++r) {
        float top = kNone;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, parts[pair * splits + s].max[r]);
        float total = 0.0f;
        float* dst = rp + (pair * g + r) * Dv;
        for (int d = 0; d < Dv; ++d) dst[d] = 0.0f;
        for (int64_t s = 0; s < splits; ++s) {
          const Partial& part = parts[pair * splits + s];
          if (part.sum[r] == 0.0f) continue;
          const float w = exp_approx(part.max[r] - top);
          total += part.sum[r] * w;
          const float* src = acc.data() + ((pair * splits + s) * g + r) * Dv;
          for (int d = 0; d < Dv; ++d) dst[d] += w * src[d];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int d = 0; d < Dv; ++d) dst[d] *= inv;
      }
    }
  });
  return result;
}

TORCH_LIBRARY_FRAGMENT(sparseattn, m) {
  m.def(
      "page_decode_attention(Tensor q, Tensor k, Tensor v, Tensor pages, int page_size, "
      "int tail_start, int tail_stop, float scale) -> Tensor");
  m.impl("page_decode_attention", c10::DispatchKey::CPU, &page_decode_attention);
}
