// Attention with query heads in vector lanes, shared by the CPU kernels that read one span of K/V
// for many query heads of one KV head: prefix_levels.cpp (the rows below a shared prefix level)
// and prefill_attention.cpp (the queries of a prefill chunk). fp32, built with -ffast-math.
//
// A chunk is kLanes query heads (each a query row and one of the G heads of the KV head), its
// queries transposed so that qt[d] holds dimension d of every lane. K and V are walked in tiles
// of up to kLanes tokens, each tile's rows copied contiguous first; per tile, token t's scores for
// all lanes are sum_d qt[d] * k_t[d] (k broadcast, no horizontal reduction), the online softmax
// runs lane-wise, and acc[d] (the weighted values, dimension d in lanes) gets sum_t p_t * v_t[d]:
// D multiply-adds per (token, kLanes query heads) for scores and DV for values (DV <= D: a value
// may be narrower than its key, multi-head latent attention's; kD specialisations have DV = D).
// Scores may be
// soft-capped (softcap * tanh(s / softcap), Gemma 2) and masked per lane to a range of positions
// (causal, and a sliding window's lower end).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vector_exp.h"

namespace lanes {

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
inline Vec vtanh(Vec x) { return vector_tanh<Vec, IVec>(x); }
// No sliding window: a lane's lowest visible position.
constexpr int32_t kNoLow = -(1 << 30);
// Not causal: a lane's highest visible position.
constexpr int32_t kNoHigh = 1 << 30;

// The next tile's K and V rows (one KV head), prefetched a line or so per dimension of the
// current tile's arithmetic rather than all at once (see paged_decode.cpp: a burst of prefetches
// waits on memory and stalls the arithmetic behind it).
struct TileAhead {
  const char* k = nullptr;  // the next tile's first K row (V: v), null when there is none
  const char* v = nullptr;
  int64_t stride = 0;     // bytes between rows
  int64_t row_lines = 0;  // lines per row
  int64_t lines = 0;      // lines of K (as many of V) in the tile
  int64_t per_dim = 0;    // lines of K (or V) per dimension of tile_update's loops
  int64_t k_done = 0, v_done = 0;

  inline void next_lines(const char* base, int64_t& done) {
    for (int64_t i = 0; i < per_dim && done < lines; ++i, ++done)
      __builtin_prefetch(base + done / row_lines * stride + done % row_lines * 64);
  }
  inline void next_k() { next_lines(k, k_done); }
  inline void next_v() {
    if (v) next_lines(v, v_done);
  }
};

// Running state of one lane chunk: qt[d] (the chunk's queries, scaled), acc[d] (weighted
// values), m and l (online softmax: running max and sum); ahead, the thread's prefetch of the
// next tile.
struct ChunkState {
  Vec* qt;
  Vec* acc;
  Vec m, l;
  TileAhead* ahead;
};

// One tile of n <= kLanes tokens at positions pos0.., kt (kLanes, D) and vt (kLanes, DV)
// row-major (rows past n are zero). softcap > 0: each (scaled) score s becomes softcap * tanh(s / softcap). kMasked:
// token pos0 + t counts for lane i only if low[i] <= pos0 + t <= high[i] (causal: high is the
// lane's query position; a sliding window: low is the first position it sees). A lane that has
// counted no token yet holds m = kNegBig; its first counted token zeroes what it held
// (exp(kNegBig - m) = 0), and one that counts none is cleared by clear_unseen.
template <int kD, bool kMasked>
inline void tile_update(ChunkState& c, const float* kt, const float* vt, int64_t n, int64_t dim,
                        int64_t value_dim, float softcap, int64_t pos0 = 0, IVec low = IVec{},
                        IVec high = IVec{}) {
  const int64_t D = kD ? kD : dim;
  const int64_t DV = kD ? kD : value_dim;
  Vec s[kLanes];
  for (int t = 0; t < kLanes; ++t) s[t] = Vec{};
  for (int64_t d = 0; d < D; ++d) {  // s[t] = q . k_t for every lane: kt broadcast, no reduction
    c.ahead->next_k();
    const Vec qd = c.qt[d];
    for (int t = 0; t < kLanes; ++t) s[t] += qd * kt[t * D + d];
  }
  if (softcap > 0.f) {
    const float inv = 1.f / softcap;
    for (int t = 0; t < kLanes; ++t) s[t] = vtanh(s[t] * inv) * softcap;
  }
  for (int t = static_cast<int>(n); t < kLanes; ++t) s[t] = splat(kNegBig);
  if (kMasked)
    for (int t = 0; t < kLanes; ++t) {
      const int32_t at = static_cast<int32_t>(pos0 + t);
      s[t] = (high >= at) & (low <= at) ? s[t] : splat(kNegBig);
    }
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
  for (int64_t d = 0; d < DV; ++d) {  // acc[d] = acc[d] * correction + sum_t p_t * v_t[d]
    c.ahead->next_v();
    Vec a = c.acc[d] * correction;
    for (int t = 0; t < kLanes; ++t) a += s[t] * vt[t * DV + d];
    c.acc[d] = a;
  }
}

// Lanes that counted no token (all their positions masked: a prefix level wholly before a
// sliding window) get an empty result: acc 0, l 1, so their output is 0 and m + log(l) is
// kNegBig, a log-sum-exp that weighs nothing in a merge.
inline void clear_unseen(ChunkState& c, int64_t D) {
  const auto seen = c.m > splat(kNegBig);
  for (int64_t d = 0; d < D; ++d) c.acc[d] = seen ? c.acc[d] : Vec{};
  c.l = seen ? c.l : splat(1.f);
}

// Scratch of one thread: kChunksPerPiece chunk states and one K and one V tile, left
// uninitialised (every piece writes what it reads). D: key lanes, DV: value lanes.
struct Scratch {
  std::unique_ptr<Vec[]> qt, acc;
  std::unique_ptr<float[]> kt, vt;
  TileAhead ahead;
  int64_t D, DV;
  Scratch(int64_t d, int64_t dv)
      : qt(new Vec[kChunksPerPiece * d]),
        acc(new Vec[kChunksPerPiece * dv]),
        kt(new float[kLanes * d]),
        vt(new float[kLanes * dv]),
        D(d),
        DV(dv) {}

  // Chunk c of a piece, reset, its queries from src (see to_lanes).
  ChunkState chunk(int64_t c, const float* const* src, float scale);
};

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

// dst[i][d] = acc[d] lane i / l lane i where dst[i] is not null: the normalised output,
// transposed back.
inline void from_lanes(const ChunkState& c, int64_t D, float* const* dst) {
  const Vec inv = 1.f / c.l;
#ifdef __AVX512F__
  if (D % 16 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = (__m512)(c.acc[d0 + j] * inv);
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        if (dst[i]) _mm512_storeu_ps(dst[i] + d0, r[i]);
    }
    return;
  }
#endif
  for (int i = 0; i < kLanes; ++i)
    if (dst[i])
      for (int64_t d = 0; d < D; ++d) dst[i][d] = c.acc[d][i] * inv[i];
}

inline ChunkState Scratch::chunk(int64_t c, const float* const* src, float scale) {
  ChunkState st{qt.get() + c * D, acc.get() + c * DV, splat(kNegBig), Vec{}, &ahead};
  for (int64_t d = 0; d < DV; ++d) st.acc[d] = Vec{};
  to_lanes(src, D, scale, st.qt);
  return st;
}

// Positions [begin, length) of one KV head, as tiles of up to kLanes tokens that never cross a
// block boundary: each tile's K and V rows copied contiguous into the scratch (zero past its n
// tokens), then tile(kt, vt, pos0, n). k and v point at the head's first element in the pools
// (v may point into K: a value kept in the key); table holds the blocks in position order;
// tok_stride and v_tok_stride are the floats between slots of K and of V.
template <class Tile>
inline void for_each_tile(const float* k, const float* v, const int64_t* table, int64_t begin,
                          int64_t length, int64_t block_size, int64_t tok_stride,
                          int64_t v_tok_stride, Scratch& scratch, Tile tile) {
  const int64_t D = scratch.D, DV = scratch.DV;
  float* kt = scratch.kt.get();
  float* vt = scratch.vt.get();
  int64_t n;
  for (int64_t pos = std::max<int64_t>(begin, 0); pos < length; pos += n) {
    n = std::min<int64_t>({kLanes, length - pos, block_size - pos % block_size});
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    for (int64_t t = 0; t < n; ++t) {  // the tile's rows, contiguous: fixed strides in tile()
      std::memcpy(kt + t * D, k + (slot + t) * tok_stride, D * sizeof(float));
      std::memcpy(vt + t * DV, v + (slot + t) * v_tok_stride, DV * sizeof(float));
    }
    std::fill(kt + n * D, kt + kLanes * D, 0.f);
    std::fill(vt + n * DV, vt + kLanes * DV, 0.f);
    TileAhead& ahead = scratch.ahead;  // the next tile, fetched during this one's arithmetic
    ahead.lines = ahead.k_done = ahead.v_done = 0;
    const int64_t next = pos + n;
    if (next < length) {
      const int64_t next_n = std::min<int64_t>({kLanes, length - next, block_size - next % block_size});
      const int64_t slot = table[next / block_size] * block_size + next % block_size;
      ahead.k = reinterpret_cast<const char*>(k + slot * tok_stride);
      // a value inside the key comes with it; one of its own has the key's row layout when
      // prefetched (V of another width is only approximated: a hint)
      ahead.v = v == k ? nullptr : reinterpret_cast<const char*>(v + slot * v_tok_stride);
      ahead.stride = tok_stride * static_cast<int64_t>(sizeof(float));
      ahead.row_lines = (D * static_cast<int64_t>(sizeof(float)) + 63) / 64;
      ahead.lines = next_n * ahead.row_lines;
      ahead.per_dim = (ahead.lines + D - 1) / D;
    }
    tile(static_cast<const float*>(kt), static_cast<const float*>(vt), pos, n);
  }
}

// fn(std::integral_constant<int, kD>) with kD the head size where it has a compiled
// specialisation (64, 128, keys and values of one size), else 0 (the sizes read at run time).
template <class Fn>
inline void with_head_size(int64_t D, int64_t DV, Fn fn) {
  if (D == 64 && DV == 64)
    fn(std::integral_constant<int, 64>{});
  else if (D == 128 && DV == 128)
    fn(std::integral_constant<int, 128>{});
  else
    fn(std::integral_constant<int, 0>{});
}

}  // namespace lanes
