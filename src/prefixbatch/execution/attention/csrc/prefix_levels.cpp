// Shared-prefix (cascade) decode attention on the CPU, fp32: each prefix level's K/V is read once
// per step for all the decode rows below it, after BatchLLM / Hydragen / FlashInfer's cascade.
// paged_decode.cpp computes each row's attention over its own blocks; this file adds the rows'
// prefix levels and merges them in by log-sum-exp. Tested against the plain PyTorch path in
// reference.py (through NativeDecodeBackend).
//
// Why a level path. Read row by row, a level's K/V comes from cache after its first row, and the
// per-row kernel is then bound by arithmetic: each query head's 16-token score tile needs a
// horizontal reduction, and a KV head has only G (e.g. 3) query heads to share a load. Here the
// query heads of every row below a level sit in the lanes of a vector (lane i: row i / G, query
// head i % G of the KV head), so a K or V element is broadcast once for kLanes query heads:
// scores for a tile of kLanes tokens are kLanes vectors (one per token) summed over D with no
// horizontal step, the online softmax runs lane-wise, and V is weighted into per-dimension
// vectors. That is D multiply-adds per (token, kLanes query heads) for scores and D for values.
//
// Layout. As paged_decode.cpp: q (B, H, D); pools (slots, KVH, D); out (B, H, D), lse (B, H).
// Levels: level_tables (L, NBL) int64 block ids, level_lengths (L,) positions (a level's own part,
// whole blocks), level_row_ptr (L + 1,) and level_rows (R,) int64: level l is read by rows
// level_rows[level_row_ptr[l] .. level_row_ptr[l + 1]) of q.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vector_exp.h"

namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;  // AVX2: two vectors of 16 would not fit in its 16 registers
#endif
// Lane chunks one piece of work holds: the K/V tile it copies is shared by this many chunks.
constexpr int64_t kChunksPerPiece = 64 / kLanes;
// Finite stand-in for -inf: the build uses -ffast-math, which assumes no infinities.
constexpr float kNegBig = -1e30f;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec splat(float x) { return Vec{} + x; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

inline Vec vexp(Vec x) { return vector_exp<Vec, IVec>(x); }

struct Levels {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* tables;  // (L, NBL)
  const int64_t* lengths;
  const int64_t* row_ptr;
  const int64_t* rows;
  int64_t H, KVH, G, D, NBL, block_size, tok_stride;
  float scale;
};

// Query heads [chunk * kLanes, + kLanes) of level `level`'s lanes for KV head `head`; each chunk
// has its own running max m, sum l and accumulator.
struct LevelPiece {
  int64_t level, head, first_chunk, end_chunk;
};

// Running state of one lane chunk: qt[d] (the chunk's queries, scaled, dimension d in lanes),
// acc[d] (weighted values), m and l (online softmax).
struct ChunkState {
  Vec* qt;
  Vec* acc;
  Vec m, l;
};

// One tile of n <= kLanes tokens, kt and vt (kLanes, D) row-major (rows past n are zero).
template <int kD>
inline void tile_update(ChunkState& c, const float* kt, const float* vt, int64_t n, int64_t dim) {
  const int64_t D = kD ? kD : dim;
  Vec s[kLanes];
  for (int t = 0; t < kLanes; ++t) s[t] = Vec{};
  for (int64_t d = 0; d < D; ++d) {  // s[t] = q . k_t for every lane: kt broadcast, no reduction
    const Vec qd = c.qt[d];
    for (int t = 0; t < kLanes; ++t) s[t] += qd * kt[t * D + d];
  }
  for (int t = static_cast<int>(n); t < kLanes; ++t) s[t] = splat(kNegBig);
  Vec top = s[0];
  for (int t = 1; t < kLanes; ++t) top = vmax(top, s[t]);
  const Vec new_m = vmax(c.m, top);
  const Vec correction = vexp(c.m - new_m);
  Vec sum = Vec{};
  for (int t = 0; t < kLanes; ++t) {
    s[t] = vexp(s[t] - new_m);
    sum += s[t];
  }
  c.l = c.l * correction + sum;
  c.m = new_m;
  for (int64_t d = 0; d < D; ++d) {  // acc[d] = acc[d] * correction + sum_t p_t * v_t[d]
    Vec a = c.acc[d] * correction;
    for (int t = 0; t < kLanes; ++t) a += s[t] * vt[t * D + d];
    c.acc[d] = a;
  }
}

// Scratch of one thread: kChunksPerPiece chunk states and one K and one V tile.
// (Left uninitialised: every piece writes what it reads.)
struct Scratch {
  std::unique_ptr<Vec[]> qt, acc;
  std::unique_ptr<float[]> kt, vt;
  explicit Scratch(int64_t D)
      : qt(new Vec[kChunksPerPiece * D]),
        acc(new Vec[kChunksPerPiece * D]),
        kt(new float[kLanes * D]),
        vt(new float[kLanes * D]) {}
};

// Lane i of chunk c of a piece holds query head `head` of level_rows slot `slot` (slot -1: past
// the level's query heads).
struct LaneHead {
  int64_t slot, head;
};

inline LaneHead lane_head(const Levels& p, const LevelPiece& piece, int64_t first, int64_t lanes,
                          int64_t c, int i) {
  const int64_t lane = (piece.first_chunk + c) * kLanes + i;
  if (lane >= lanes) return {-1, 0};
  return {first + lane / p.G, piece.head * p.G + lane % p.G};
}

#ifdef __AVX512F__
// r[i][j] <-> r[j][i] for a 16x16 block of floats held in 16 vectors.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit pairs of rows 2i, 2i + 1
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // per 128-bit lane k: columns 4k..4k+3 of rows g..g+3
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[g + h]), b = _mm512_castps_pd(t[g + h + 2]);
      r[g + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[g + h + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  // r[g + m] now holds, in its 128-bit lane k, column 4k + m' of rows g..g+3, where m' is
  // 0, 2, 1, 3 for m = 0, 1, 2, 3. Gather the four row groups' lanes per column.
  const int order[4] = {0, 2, 1, 3};
  for (int m = 0; m < 4; ++m) {
    const __m512 a = r[m], b = r[4 + m], c = r[8 + m], d = r[12 + m];
    const __m512 x0 = _mm512_shuffle_f32x4(a, b, 0x88), x1 = _mm512_shuffle_f32x4(a, b, 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(c, d, 0x88), y1 = _mm512_shuffle_f32x4(c, d, 0xDD);
    t[order[m]] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    t[8 + order[m]] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    t[4 + order[m]] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    t[12 + order[m]] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// qt[d] lane i = src[i][d] * scale (0 where src[i] is null): each lane's query row, transposed.
inline void to_lanes(const float* const* src, int64_t D, float scale, Vec* qt) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = src[i] ? _mm512_mul_ps(_mm512_loadu_ps(src[i] + d0), s) : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < 16; ++j) qt[d0 + j] = (Vec)r[j];
    }
    return;
  }
#endif
  for (int i = 0; i < kLanes; ++i)
    for (int64_t d = 0; d < D; ++d) qt[d][i] = src[i] ? src[i][d] * scale : 0.f;
}

// dst[i][d] = acc[d] lane i * inv lane i where dst[i] is not null: the transpose back.
inline void from_lanes(const Vec* acc, Vec inv, int64_t D, float* const* dst) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = (__m512)(acc[d0 + j] * inv);
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        if (dst[i]) _mm512_storeu_ps(dst[i] + d0, r[i]);
    }
    return;
  }
#endif
  for (int i = 0; i < kLanes; ++i)
    if (dst[i])
      for (int64_t d = 0; d < D; ++d) dst[i][d] = acc[d][i] * inv[i];
}

// Partial results of one piece: per lane, out (D,) normalised and lse, at part_out[slot, head]
// and part_lse[slot, head] where slot indexes level_rows.
template <int kD>
void attend_level_piece(const Levels& p, const LevelPiece& piece, Scratch& scratch,
                        float* part_out, float* part_lse) {
  const int64_t D = kD ? kD : p.D;
  const int64_t first = p.row_ptr[piece.level];
  const int64_t lanes = (p.row_ptr[piece.level + 1] - first) * p.G;
  const int64_t chunks = piece.end_chunk - piece.first_chunk;
  std::vector<ChunkState> state(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    ChunkState& st = state[c];
    st.qt = scratch.qt.get() + c * D;
    st.acc = scratch.acc.get() + c * D;
    st.m = splat(kNegBig);
    st.l = Vec{};
    for (int64_t d = 0; d < D; ++d) st.acc[d] = Vec{};
    const float* src[kLanes];  // each lane's query head (null past the level's: zero)
    for (int i = 0; i < kLanes; ++i) {
      const LaneHead at = lane_head(p, piece, first, lanes, c, i);
      src[i] = at.slot < 0 ? nullptr : p.q + (p.rows[at.slot] * p.H + at.head) * D;
    }
    to_lanes(src, D, p.scale, st.qt);
  }
  const int64_t length = p.lengths[piece.level];
  const int64_t* table = p.tables + piece.level * p.NBL;
  float* kt = scratch.kt.get();
  float* vt = scratch.vt.get();
  int64_t n;  // tokens in the tile: up to kLanes, never across a block boundary
  for (int64_t pos = 0; pos < length; pos += n) {
    n = std::min<int64_t>({kLanes, length - pos, p.block_size - pos % p.block_size});
    const int64_t slot = table[pos / p.block_size] * p.block_size + pos % p.block_size;
    const float* k = p.k + slot * p.tok_stride + piece.head * D;
    const float* v = p.v + slot * p.tok_stride + piece.head * D;
    for (int64_t t = 0; t < n; ++t) {  // the tile's rows, contiguous: fixed strides below
      std::memcpy(kt + t * D, k + t * p.tok_stride, D * sizeof(float));
      std::memcpy(vt + t * D, v + t * p.tok_stride, D * sizeof(float));
    }
    std::fill(kt + n * D, kt + kLanes * D, 0.f);
    std::fill(vt + n * D, vt + kLanes * D, 0.f);
    for (ChunkState& st : state) tile_update<kD>(st, kt, vt, n, D);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const ChunkState& st = state[c];
    float* dst[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const LaneHead at = lane_head(p, piece, first, lanes, c, i);
      dst[i] = at.slot < 0 ? nullptr : part_out + (at.slot * p.H + at.head) * D;
      if (at.slot >= 0) part_lse[at.slot * p.H + at.head] = st.m[i] + std::log(st.l[i]);
    }
    from_lanes(st.acc, 1.f / st.l, D, dst);
  }
}

void run_piece(const Levels& p, const LevelPiece& piece, Scratch& scratch, float* part_out,
               float* part_lse) {
  if (p.D == 64)
    attend_level_piece<64>(p, piece, scratch, part_out, part_lse);
  else if (p.D == 128)
    attend_level_piece<128>(p, piece, scratch, part_out, part_lse);
  else
    attend_level_piece<0>(p, piece, scratch, part_out, part_lse);
}

}  // namespace

// Adds each row's prefix levels to out (B, H, D) and lse (B, H), which hold its attention over
// its own blocks (from paged_decode), in place: the levels' partial results merged by their
// log-sum-exp.
void attend_prefix_levels(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                          torch::Tensor out, torch::Tensor lse, torch::Tensor level_tables,
                          torch::Tensor level_lengths, torch::Tensor level_row_ptr,
                          torch::Tensor level_rows, int64_t block_size, double scale) {
  for (const auto& t : {q, k_pool, v_pool, out, lse})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(),
                "attend_prefix_levels: contiguous fp32 tensors only");
  for (const auto& t : {level_tables, level_lengths, level_row_ptr, level_rows})
    TORCH_CHECK(t.dtype() == torch::kInt64 && t.is_contiguous(),
                "attend_prefix_levels: contiguous int64 index tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_pool.size(1);
  const int64_t L = level_lengths.size(0), R = level_rows.size(0);
  TORCH_CHECK(level_row_ptr.size(0) == L + 1 && level_tables.size(0) == L,
              "attend_prefix_levels: level arrays of different lengths");
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(level_rows.data_ptr<int64_t>()[i] >= 0 && level_rows.data_ptr<int64_t>()[i] < B,
                "attend_prefix_levels: a level row outside the batch");
  Levels p{q.data_ptr<float>(),
           k_pool.data_ptr<float>(),
           v_pool.data_ptr<float>(),
           level_tables.data_ptr<int64_t>(),
           level_lengths.data_ptr<int64_t>(),
           level_row_ptr.data_ptr<int64_t>(),
           level_rows.data_ptr<int64_t>(),
           H,
           KVH,
           H / KVH,
           D,
           level_tables.size(1),
           block_size,
           KVH * D,
           static_cast<float>(scale)};

  std::vector<LevelPiece> pieces;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t chunks = ((p.row_ptr[l + 1] - p.row_ptr[l]) * p.G + kLanes - 1) / kLanes;
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t c = 0; c < chunks; c += kChunksPerPiece)
        pieces.push_back({l, h, c, std::min(chunks, c + kChunksPerPiece)});
  }
  // Per level_rows slot, every element written by its piece.
  std::unique_ptr<float[]> part_out(new float[R * H * D]), part_lse(new float[R * H]);
  std::atomic<int64_t> next{0};
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch(D);
    for (int64_t i = next++; i < num_pieces; i = next++)
      run_piece(p, pieces[i], scratch, part_out.get(), part_lse.get());
  });

  // Each row's slots (one per level above it), then the merge.
  std::vector<int64_t> slot_ptr(B + 1, 0), slots(R);
  for (int64_t s = 0; s < R; ++s) ++slot_ptr[p.rows[s] + 1];
  for (int64_t b = 0; b < B; ++b) slot_ptr[b + 1] += slot_ptr[b];
  std::vector<int64_t> fill(slot_ptr.begin(), slot_ptr.end() - 1);
  for (int64_t s = 0; s < R; ++s) slots[fill[p.rows[s]]++] = s;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        float top = lp[b * H + h];
        for (int64_t i = slot_ptr[b]; i < slot_ptr[b + 1]; ++i)
          top = std::max(top, part_lse[slots[i] * H + h]);
        float* o = op + (b * H + h) * D;
        const float w_own = std::exp(lp[b * H + h] - top);
        float total = w_own;
        for (int64_t d = 0; d < D; ++d) o[d] *= w_own;
        for (int64_t i = slot_ptr[b]; i < slot_ptr[b + 1]; ++i) {
          const float w = std::exp(part_lse[slots[i] * H + h] - top);
          const float* po = part_out.get() + (slots[i] * H + h) * D;
          total += w;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += w * po[d];
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        lp[b * H + h] = top + std::log(total);
      }
    }
  });
}
