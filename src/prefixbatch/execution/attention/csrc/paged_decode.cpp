// Decode attention read straight from the paged KV pool (CPU, fp32): one query token per
// sequence, no gather copy of the context. Built at first use by prefixbatch/execution/attention/
// native.py; the plain PyTorch path in reference.py is what it is tested against.
//
// Layout. q (B, H, D), each row's heads contiguous (rows may be strided: a view into the fused
// qkv output); k_pool (slots, KVH, D) of one layer, slot = block * block_size + offset, so one
// block of K is block_size * KVH * D contiguous floats; v_pool (slots, KVH, DV), DV <= D: its own
// contiguous pool, or a view of K's first DV lanes (multi-head latent attention keeps the value
// inside the key: one KV head [c_kv, k_pe] whose value is c_kv); block_tables (B, NB)
// int64 with a sequence's blocks in position order; lengths (B,) int64 positions attended (>= 1).
// Query head h * G + g (g < G = H / KVH) reads KV head h. A sliding window (window > 0) limits
// a row to its last `window` positions: its pieces start at the window's first block, whose
// earlier tokens are masked. Soft-capped scores (softcap > 0, Gemma 2) are capped before the
// softmax.
//
// Algorithm. The work is cut into pieces: a piece is a run of one sequence's blocks, the whole
// sequence unless the batch is too small to keep every thread busy, in which case long contexts
// are split (>= kMinPieceBlocks blocks a piece) and the pieces' results merged afterwards by
// their log-sum-exp. Threads take pieces in sequence order from a shared counter (dynamic, so a
// thread slowed by other load on the machine takes fewer); members of a prefix group sit next to
// each other in the batch, so their shared blocks come from DRAM once and from cache after.
// A piece walks its blocks in order and, per block, all KV heads: the block's K and V are read
// whole and contiguously while the next block (anywhere in the pool) is prefetched; during its
// last block, the first block of the thread's next piece is (a row's first block was otherwise
// read on demand: at 192 rows of 40-200 tokens that cost 5-8% of the kernel's bandwidth). The
// prefetches are spread over the block's arithmetic, a few lines per tile of scores and per V
// row, rather than issued all at once: a burst of a whole block's lines filled the core's queue
// of outstanding misses, so the burst waited on memory and the arithmetic waited on the burst
// (spread, bench/decode_kernel.py streamed 25-30% more GB/s from DRAM and 40% more from L3). Per
// KV head the G query heads share each K and V row: scores for 16 tokens at a time, each
// token's dot product accumulated in a vector and the 16 vectors reduced together (AVX-512;
// elsewhere one reduction per token); online softmax over blocks (running max and sum per query
// head); then the V rows weighted into accumulators kept in registers for the block.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>  // the bindings; not torch/extension.h: 3x its compile time

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "value_pool.h"
#include "vector_exp.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// Finite stand-in for -inf: the build uses -ffast-math, which assumes no infinities.
constexpr float kNegBig = -1e30f;
// A split piece is at least this many blocks, so merging partials stays a small cost.
constexpr int64_t kMinPieceBlocks = 16;
// Pieces per thread below which long contexts are split.
constexpr int64_t kPiecesPerThread = 4;

typedef float V16 __attribute__((vector_size(64)));  // one AVX-512 register, two AVX2 ones
typedef int32_t I16 __attribute__((vector_size(64)));

struct Problem {
  const float* q;
  int64_t q_row_stride;  // floats between rows of q (its heads contiguous within a row)
  const float* k;
  const float* v;
  const int64_t* tables;
  const int64_t* lengths;
  int64_t H, KVH, G, D, NB, block_size;
  int64_t tok_stride;    // KVH * D: floats between consecutive slots of the K pool
  int64_t DV;            // lanes of a value (D unless it is narrower)
  int64_t v_tok_stride, v_head_stride;  // floats between slots and between heads of V
  int64_t score_stride;  // block_size rounded up to 16: floats between query heads' scores
  float scale;
  int64_t window;  // 0: none, else a row sees only its last `window` positions
  float softcap;   // 0: none, else scores become softcap * tanh(score / softcap)
};

// The first position row b sees (its query is its last position) and its block.
inline int64_t first_seen(const Problem& p, int64_t b) {
  return p.window ? std::max<int64_t>(0, p.lengths[b] - p.window) : 0;
}

// The next block's K and V (all heads), prefetched a few cache lines at a time.
struct BlockPrefetch {
  const char* k = nullptr;
  const char* v = nullptr;  // null: the value is inside the key, fetched with it
  int64_t bytes = 0;      // of the block's K (as many of its V)
  int64_t done = 0;       // bytes of each already prefetched
  int64_t per_row = 1;    // lines of K and of V per V row weighted (block_values)

  // The next `lines` lines of K and of V, if any are left.
  inline void lines(int64_t count) {
    for (int64_t i = 0; i < count && done < bytes; ++i, done += 64) {
      __builtin_prefetch(k + done);
      if (v) __builtin_prefetch(v + done);
    }
  }
  inline void rest() { lines((bytes - done + 63) / 64); }
};

// Lines of K and of V prefetched per tile of 16 scores (block_scores). With one line per V row,
// this spreads a SmolLM2 block's 192 lines of each over its arithmetic (measured against 2 and
// 6: 4 and 6 were best, 2 lost 3%).
constexpr int64_t kLinesPerScoreTile = 4;

struct Piece {
  int64_t b, first_block, end_block;
  float* out;  // (H, DV), normalised
  float* lse;  // (H,)
};

#ifdef __AVX512F__
// Lane i of the result is the sum of v[i]'s 16 lanes: 15 adds for 16 dot products instead of a
// full horizontal reduction each.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a b a b] partials of v[2i], v[2i+1]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a b c d]
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: two halves of 4 sums, two halves of 4 more
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}
#endif

// s[g * score_stride + t] = scale * q_g . k_t for the n (<= block_size) tokens of one block and
// KV head; k points at token 0's row of that head.
inline void block_scores(const Problem& p, const float* q, const float* k, int64_t n, float* s,
                         BlockPrefetch& pf) {
#ifdef __AVX512F__
  if (p.D % 16 == 0) {
    const __m512 scale = _mm512_set1_ps(p.scale);
    for (int64_t g = 0; g < p.G; ++g) {
      const float* qg = q + g * p.D;
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        // Tokens past n repeat the last row (fixed trip count, dot[] stays in registers); their
        // scores land in the padding of s and are never read.
        const int64_t last = n - 1 - t0;
        pf.lines(kLinesPerScoreTile);
        __m512 dot[16];
        for (int t = 0; t < 16; ++t) dot[t] = _mm512_setzero_ps();
        for (int64_t d = 0; d < p.D; d += 16) {
          const __m512 qd = _mm512_loadu_ps(qg + d);
          for (int t = 0; t < 16; ++t) {
            const float* kt = k + (t0 + std::min<int64_t>(t, last)) * p.tok_stride + d;
            dot[t] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(kt), dot[t]);
          }
        }
        _mm512_storeu_ps(s + g * p.score_stride + t0, _mm512_mul_ps(sum_lanes16(dot), scale));
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < p.G; ++g) {
    const float* qg = q + g * p.D;
    for (int64_t t = 0; t < n; ++t) {
      if (t % 16 == 0) pf.lines(kLinesPerScoreTile);
      const float* kt = k + t * p.tok_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < p.D; ++d) dot += qg[d] * kt[d];
      s[g * p.score_stride + t] = dot * p.scale;
    }
  }
}

// acc_g = acc_g * correction[g] + sum_t s[g, t] * v_t over the n tokens of one block and KV head
// (DV lanes each).
inline void block_values(const Problem& p, const float* v, int64_t n, const float* s,
                         const float* correction, float* acc, BlockPrefetch& pf) {
  const int64_t DV = p.DV, vs = p.v_tok_stride;
#ifdef __AVX512F__
  if (DV % 16 == 0) {
    for (int64_t g = 0; g < p.G; ++g) {
      const float* sg = s + g * p.score_stride;
      float* a = acc + g * DV;
      const __m512 c = _mm512_set1_ps(correction[g]);
      int64_t d = 0;
      for (; d + 64 <= DV; d += 64) {  // four accumulators in registers across the block
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(a + d), c);
        __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(a + d + 16), c);
        __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(a + d + 32), c);
        __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(a + d + 48), c);
        for (int64_t t = 0; t < n; ++t) {
          pf.lines(pf.per_row);
          const __m512 w = _mm512_set1_ps(sg[t]);
          const float* vt = v + t * vs + d;
          a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt), a0);
          a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16), a1);
          a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 32), a2);
          a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 48), a3);
        }
        _mm512_storeu_ps(a + d, a0);
        _mm512_storeu_ps(a + d + 16, a1);
        _mm512_storeu_ps(a + d + 32, a2);
        _mm512_storeu_ps(a + d + 48, a3);
      }
      for (; d < DV; d += 16) {
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(a + d), c);
        for (int64_t t = 0; t < n; ++t)
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(sg[t]), _mm512_loadu_ps(v + t * vs + d), a0);
        _mm512_storeu_ps(a + d, a0);
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < p.G; ++g) {
    float* a = acc + g * DV;
#pragma omp simd
    for (int64_t d = 0; d < DV; ++d) a[d] *= correction[g];
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* vt = v + t * vs;
    pf.lines(p.G * pf.per_row);
    for (int64_t g = 0; g < p.G; ++g) {
      const float w = s[g * p.score_stride + t];
      float* a = acc + g * DV;
#pragma omp simd
      for (int64_t d = 0; d < DV; ++d) a[d] += w * vt[d];
    }
  }
}

// Online softmax over one block's scores [lo, n) of a query head, in tiles of 16 (sg holds n
// rounded up to 16 floats; the padding and the scores before lo, outside a sliding window, are
// ignored): sg becomes exp(score - new max), m and l the running max and sum, correction the
// factor for what was accumulated before this block. softcap > 0: the scores are soft-capped
// first.
inline void block_softmax(float* sg, int64_t lo, int64_t n, float softcap, float& m, float& l,
                          float& correction) {
  const I16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  V16 top = V16{} + kNegBig;
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    V16 x;
    std::memcpy(&x, sg + t0, sizeof x);
    if (softcap > 0.f) {
      x = vector_tanh<V16, I16>(x * (1.f / softcap)) * softcap;
      std::memcpy(sg + t0, &x, sizeof x);
    }
    x = (lane < static_cast<int32_t>(n - t0)) & (lane >= static_cast<int32_t>(lo - t0)) ? x : top;
    top = x > top ? x : top;
  }
  float block_max = kNegBig;
  for (int i = 0; i < 16; ++i) block_max = std::max(block_max, top[i]);
  const float new_max = std::max(m, block_max);
  V16 sum = V16{};
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    V16 x;
    std::memcpy(&x, sg + t0, sizeof x);
    x = vector_exp<V16, I16>(x - new_max);
    x = (lane < static_cast<int32_t>(n - t0)) & (lane >= static_cast<int32_t>(lo - t0)) ? x
                                                                                         : V16{};
    std::memcpy(sg + t0, &x, sizeof x);
    sum += x;
  }
  float total = 0.f;
  for (int i = 0; i < 16; ++i) total += sum[i];
  correction = std::exp(m - new_max);
  l = l * correction + total;
  m = new_max;
}

// One piece: attention of sequence b's query over its blocks [first_block, end_block).
// Scratch: acc (H * DV), m and l (H), correction (G), s (G * score_stride).
void attend_piece(const Problem& p, const Piece& piece, const Piece* after, float* acc, float* m,
                  float* l, float* correction, float* s) {
  const int64_t b = piece.b, n_ctx = p.lengths[b], seen = first_seen(p, b);
  const float* q = p.q + b * p.q_row_stride;
  const int64_t* table = p.tables + b * p.NB;
  std::fill(acc, acc + p.H * p.DV, 0.f);
  std::fill(m, m + p.H, kNegBig);
  std::fill(l, l + p.H, 0.f);
  for (int64_t j = piece.first_block; j < piece.end_block; ++j) {
    const int64_t n = std::min(p.block_size, n_ctx - j * p.block_size);
    const int64_t lo = std::max<int64_t>(0, seen - j * p.block_size);  // before the window
    int64_t next = -1, next_n = 0;  // the block to prefetch and its slots in use
    if (j + 1 < piece.end_block) {
      next = table[j + 1];
      next_n = std::min(p.block_size, n_ctx - (j + 1) * p.block_size);
    } else if (after != nullptr) {  // the first block of this thread's next piece
      const int64_t a = after->b, first = after->first_block;
      next = p.tables[a * p.NB + first];
      next_n = std::min(p.block_size, p.lengths[a] - first * p.block_size);
    }
    BlockPrefetch pf;
    if (next >= 0) {
      const int64_t at = next * p.block_size * p.tok_stride;
      pf.k = reinterpret_cast<const char*>(p.k + at);
      const int64_t v_at = next * p.block_size * p.v_tok_stride;
      pf.v = p.v == p.k ? nullptr : reinterpret_cast<const char*>(p.v + v_at);
      pf.bytes = next_n * p.tok_stride * static_cast<int64_t>(sizeof(float));
      pf.per_row = std::max<int64_t>(1, pf.bytes / 64 / (p.KVH * p.G * n));
    }
    const int64_t offset = table[j] * p.block_size * p.tok_stride;
    const int64_t v_offset = table[j] * p.block_size * p.v_tok_stride;
    for (int64_t h = 0; h < p.KVH; ++h) {
      const int64_t qh = h * p.G;  // first query head of KV head h
      block_scores(p, q + qh * p.D, p.k + offset + h * p.D, n, s, pf);
      for (int64_t g = 0; g < p.G; ++g)
        block_softmax(s + g * p.score_stride, lo, n, p.softcap, m[qh + g], l[qh + g],
                      correction[g]);
      block_values(p, p.v + v_offset + h * p.v_head_stride, n, s, correction, acc + qh * p.DV,
                   pf);
    }
    pf.rest();  // what the arithmetic did not cover
  }
  for (int64_t h = 0; h < p.H; ++h) {
    const float inv = 1.f / l[h];
    for (int64_t d = 0; d < p.DV; ++d) piece.out[h * p.DV + d] = acc[h * p.DV + d] * inv;
    piece.lse[h] = m[h] + std::log(l[h]);
  }
}

}  // namespace

// Returns out (B, H, DV) and the log-sum-exp of the scores, lse (B, H). window > 0: each row
// attends only its last `window` positions (the blocks before them are not read); softcap > 0:
// scores are soft-capped.
std::vector<at::Tensor> paged_decode(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                                     at::Tensor block_tables, at::Tensor lengths,
                                     int64_t block_size, double scale, int64_t window,
                                     double softcap) {
  TORCH_CHECK(q.dtype() == at::kFloat && k_pool.dtype() == at::kFloat &&
                  v_pool.dtype() == at::kFloat,
              "paged_decode: fp32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_pool.size(1);
  const int64_t DV = v_pool.size(2);
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k_pool.is_contiguous() &&
                  value_pool_ok(k_pool, v_pool) && block_tables.is_contiguous() &&
                  lengths.is_contiguous(),
              "paged_decode: contiguous tensors only (q: each row's heads contiguous; V: its "
              "own pool or K's first lanes)");
  Problem p{q.data_ptr<float>(),
            q.stride(0),
            k_pool.data_ptr<float>(),
            v_pool.data_ptr<float>(),
            block_tables.data_ptr<int64_t>(),
            lengths.data_ptr<int64_t>(),
            H,
            KVH,
            H / KVH,
            D,
            block_tables.size(1),
            block_size,
            KVH * D,
            DV,
            v_pool.stride(0),
            v_pool.stride(1),
            (block_size + 15) / 16 * 16,
            static_cast<float>(scale),
            window,
            static_cast<float>(softcap)};
  TORCH_CHECK(window >= 0 && softcap >= 0, "paged_decode: a negative window or soft-cap");
  auto out = at::empty({B, H, DV}, q.options());
  auto lse = at::empty({B, H}, q.options());
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();

  // Split long contexts only when the batch has too few sequences for the threads.
  const int64_t threads = at::get_num_threads();
  int64_t total_blocks = 0;
  for (int64_t b = 0; b < B; ++b)
    total_blocks += (p.lengths[b] + block_size - 1) / block_size - first_seen(p, b) / block_size;
  const int64_t piece_blocks =
      B >= kPiecesPerThread * threads
          ? p.NB
          : std::max(kMinPieceBlocks, total_blocks / (kPiecesPerThread * threads));
  std::vector<Piece> pieces;
  std::vector<int64_t> first_piece(B + 1);  // pieces of sequence b: [first_piece[b], ..[b + 1])
  int64_t split_pieces = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = first_seen(p, b) / block_size;  // the window's first block
    const int64_t blocks = (p.lengths[b] + block_size - 1) / block_size - first;
    first_piece[b] = static_cast<int64_t>(pieces.size());
    const int64_t count = (blocks + piece_blocks - 1) / piece_blocks;
    for (int64_t i = 0; i < count; ++i)
      pieces.push_back(
          {b, first + i * blocks / count, first + (i + 1) * blocks / count, nullptr, nullptr});
    if (count > 1) split_pieces += count;
  }
  first_piece[B] = static_cast<int64_t>(pieces.size());
  // Partial results of split sequences (normalised out and lse per piece); others write directly.
  std::vector<float> part_out(split_pieces * H * DV), part_lse(split_pieces * H);
  int64_t next_part = 0;
  for (int64_t b = 0; b < B; ++b) {
    const bool split = first_piece[b + 1] - first_piece[b] > 1;
    for (int64_t i = first_piece[b]; i < first_piece[b + 1]; ++i) {
      pieces[i].out = split ? part_out.data() + next_part * H * DV : op + b * H * DV;
      pieces[i].lse = split ? part_lse.data() + next_part * H : lp + b * H;
      next_part += split;
    }
  }

  std::atomic<int64_t> next{0};
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> acc(H * DV), m(H), l(H), correction(p.G), s(p.G * p.score_stride);
    // Each thread claims its next piece before it starts the current one, so that the current
    // piece's last block can prefetch the next piece's first.
    for (int64_t i = next++; i < num_pieces;) {
      const int64_t following = next++;
      attend_piece(p, pieces[i], following < num_pieces ? &pieces[following] : nullptr,
                   acc.data(), m.data(), l.data(), correction.data(), s.data());
      i = following;
    }
  });

  for (int64_t b = 0; b < B; ++b) {  // merge split sequences' pieces by their log-sum-exp
    if (first_piece[b + 1] - first_piece[b] == 1) continue;
    for (int64_t h = 0; h < H; ++h) {
      float top = kNegBig;
      for (int64_t i = first_piece[b]; i < first_piece[b + 1]; ++i)
        top = std::max(top, pieces[i].lse[h]);
      float total = 0.f;
      float* o = op + (b * H + h) * DV;
      std::fill(o, o + DV, 0.f);
      for (int64_t i = first_piece[b]; i < first_piece[b + 1]; ++i) {
        const float w = std::exp(pieces[i].lse[h] - top);
        total += w;
        const float* po = pieces[i].out + h * DV;
        for (int64_t d = 0; d < DV; ++d) o[d] += w * po[d];
      }
      for (int64_t d = 0; d < DV; ++d) o[d] /= total;
      lp[b * H + h] = top + std::log(total);
    }
  }
  return {out, lse};
}

// prefix_levels.cpp, prefill_attention.cpp and kv_write.cpp, built into the same module.
void attend_prefix_levels(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                          at::Tensor out, at::Tensor lse, at::Tensor level_tables,
                          at::Tensor level_lengths, at::Tensor level_row_ptr,
                          at::Tensor level_rows, int64_t block_size, double scale,
                          at::Tensor level_starts, at::Tensor positions, int64_t window,
                          double softcap);
void prefill_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                       at::Tensor out, at::Tensor block_tables, at::Tensor q_start,
                       at::Tensor q_len, at::Tensor context_len, int64_t block_size,
                       double scale, int64_t window, double softcap, at::Tensor sinks);
void write_kv(at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots, at::Tensor k,
              at::Tensor v);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV pool");
  m.def("attend_prefix_levels", &attend_prefix_levels,
        "merge rows' shared prefix levels into their decode attention, in place");
  m.def("prefill_attention", &prefill_attention,
        "causal attention of prefill chunks over their sequences' paged KV");
  m.def("write_kv", &write_kv, "store a step's new K and V rows at their pool slots");
}
