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
#include <vector>

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

// exp(x) lane-wise, 0 below -87: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, and
// Cephes' expf polynomial for e^r (relative error ~1e-7).
inline Vec vexp(Vec x) {
  const Vec lo = splat(-87.f), hi = splat(88.f);
  const Vec xc = x < lo ? lo : (x > hi ? hi : x);
  const IVec n = __builtin_convertvector(xc * 1.44269504f + 128.5f, IVec) - 128;  // floor(+0.5)
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = xc - nf * 0.693359375f - nf * -2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IVec bits = (n + 127) << 23;  // 2^n as a float's exponent field
  Vec pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return x < lo ? Vec{} : p * pow2;
}

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
struct Scratch {
  std::vector<Vec> qt, acc;
  std::vector<float> kt, vt;
  explicit Scratch(int64_t D)
      : qt(kChunksPerPiece * D), acc(kChunksPerPiece * D), kt(kLanes * D), vt(kLanes * D) {}
};

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
    st.qt = scratch.qt.data() + c * D;
    st.acc = scratch.acc.data() + c * D;
    st.m = splat(kNegBig);
    st.l = Vec{};
    for (int64_t d = 0; d < D; ++d) st.acc[d] = Vec{};
    for (int i = 0; i < kLanes; ++i) {  // lanes past the level's query heads stay zero
      const int64_t lane = (piece.first_chunk + c) * kLanes + i;
      const float* qh = nullptr;
      if (lane < lanes)
        qh = p.q + (p.rows[first + lane / p.G] * p.H + piece.head * p.G + lane % p.G) * D;
      for (int64_t d = 0; d < D; ++d) st.qt[d][i] = qh ? qh[d] * p.scale : 0.f;
    }
  }
  const int64_t length = p.lengths[piece.level];
  const int64_t* table = p.tables + piece.level * p.NBL;
  float* kt = scratch.kt.data();
  float* vt = scratch.vt.data();
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
    for (int i = 0; i < kLanes; ++i) {
      const int64_t lane = (piece.first_chunk + c) * kLanes + i;
      if (lane >= lanes) break;
      const int64_t at = (first + lane / p.G) * p.H + piece.head * p.G + lane % p.G;
      const float inv = 1.f / st.l[i];
      for (int64_t d = 0; d < D; ++d) part_out[at * D + d] = st.acc[d][i] * inv;
      part_lse[at] = st.m[i] + std::log(st.l[i]);
    }
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
  std::vector<float> part_out(R * H * D), part_lse(R * H);  // per level_rows slot
  std::atomic<int64_t> next{0};
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch(D);
    for (int64_t i = next++; i < num_pieces; i = next++)
      run_piece(p, pieces[i], scratch, part_out.data(), part_lse.data());
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
          const float* po = part_out.data() + (slots[i] * H + h) * D;
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
