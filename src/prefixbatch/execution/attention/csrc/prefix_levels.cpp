// Shared-prefix (cascade) decode attention on the CPU, fp32: each prefix level's K/V is read once
// per step for all the decode rows below it, after BatchLLM / Hydragen / FlashInfer's cascade.
// paged_decode.cpp computes each row's attention over its own blocks; this file adds the rows'
// prefix levels and merges them in by log-sum-exp. Tested against the plain PyTorch path in
// reference.py (through CpuBackend).
//
// Why a level path. Read row by row, a level's K/V comes from cache after its first row, and the
// per-row kernel is then bound by arithmetic: each query head's 16-token score tile needs a
// horizontal reduction, and a KV head has only G (e.g. 3) query heads to share a load. Here the
// query heads of every row below a level sit in vector lanes (lane_attention.h; lane i: row
// i / G, query head i % G of the KV head), so each K or V element is loaded once for kLanes
// query heads.
//
// Layout. As paged_decode.cpp: q (B, H, D), rows possibly strided; k_pool (slots, KVH, D),
// v_pool (slots, KVH, DV) (its own pool or K's first lanes); out (B, H, DV), lse (B, H).
// Levels: level_tables (L, NBL) int64 block ids, level_lengths (L,) positions (a level's own part,
// whole blocks), level_row_ptr (L + 1,) and level_rows (R,) int64: level l is read by rows
// level_rows[level_row_ptr[l] .. level_row_ptr[l + 1]) of q.
// Sliding window (window > 0): level_starts (L,) the position of each level's first token and
// positions (B,) each row's query position; a row sees a level's tokens at positions
// > position - window only, and a piece whose rows see none of its level skips it. softcap > 0:
// scores are soft-capped.
// ATen headers only: the bindings (and the heavy torch/extension.h) are in paged_decode.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "lane_attention.h"
#include "value_pool.h"

namespace {

using namespace lanes;

struct Levels {
  const float* q;
  int64_t q_row_stride;
  const float* k;
  const float* v;
  const int64_t* tables;  // (L, NBL)
  const int64_t* lengths;
  const int64_t* row_ptr;
  const int64_t* rows;
  const int64_t* starts;     // (L,) with a window, else null
  const int64_t* positions;  // (B,) with a window, else null
  int64_t H, KVH, G, D, NBL, block_size, tok_stride;
  int64_t DV, v_tok_stride, v_head_stride;  // V's lanes and strides
  float scale;
  int64_t window;  // 0: none
  float softcap;   // 0: none
};

// Query heads [chunk * kLanes, + kLanes) of level `level`'s lanes for KV head `head`; each chunk
// has its own running max m, sum l and accumulator.
struct LevelPiece {
  int64_t level, head, first_chunk, end_chunk;
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

// Partial results of one piece: per lane, out (DV,) normalised and lse, at part_out[slot, head]
// and part_lse[slot, head] where slot indexes level_rows.
template <int kD>
void attend_level_piece(const Levels& p, const LevelPiece& piece, Scratch& scratch,
                        float* part_out, float* part_lse) {
  const int64_t D = kD ? kD : p.D, DV = kD ? kD : p.DV;
  const int64_t first = p.row_ptr[piece.level];
  const int64_t lanes = (p.row_ptr[piece.level + 1] - first) * p.G;
  const int64_t chunks = piece.end_chunk - piece.first_chunk;
  ChunkState state[kChunksPerPiece];
  IVec low[kChunksPerPiece];  // each lane's first visible position of the level (window)
  int64_t see_from = p.lengths[piece.level], all_see = 0;  // over the piece's lanes
  for (int64_t c = 0; c < chunks; ++c) {
    const float* src[kLanes];  // each lane's query head (null past the level's: zero)
    for (int i = 0; i < kLanes; ++i) {
      const LaneHead at = lane_head(p, piece, first, lanes, c, i);
      src[i] = at.slot < 0 ? nullptr : p.q + p.rows[at.slot] * p.q_row_stride + at.head * D;
      int64_t from = 0;  // in the level's positions
      if (p.window && at.slot >= 0)
        from = p.positions[p.rows[at.slot]] - p.window + 1 - p.starts[piece.level];
      low[c][i] = static_cast<int32_t>(std::max<int64_t>(from, kNoLow));
      if (at.slot >= 0) {
        see_from = std::min(see_from, from);
        all_see = std::max(all_see, from);
      }
    }
    state[c] = scratch.chunk(c, src, p.scale);
  }
  const IVec high = IVec{} + kNoHigh;
  for_each_tile(p.k + piece.head * D, p.v + piece.head * p.v_head_stride,
                p.tables + piece.level * p.NBL, see_from, p.lengths[piece.level], p.block_size,
                p.tok_stride, p.v_tok_stride, scratch,
                [&](const float* kt, const float* vt, int64_t pos0, int64_t n) {
                  for (int64_t c = 0; c < chunks; ++c)
                    if (pos0 >= all_see)  // every lane sees the whole tile
                      tile_update<kD, false>(state[c], kt, vt, n, D, DV, p.softcap);
                    else
                      tile_update<kD, true>(state[c], kt, vt, n, D, DV, p.softcap, pos0, low[c],
                                            high);
                });
  for (int64_t c = 0; c < chunks; ++c) {
    if (p.window) clear_unseen(state[c], DV);
    float* dst[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const LaneHead at = lane_head(p, piece, first, lanes, c, i);
      dst[i] = at.slot < 0 ? nullptr : part_out + (at.slot * p.H + at.head) * DV;
      if (at.slot >= 0)
        part_lse[at.slot * p.H + at.head] = state[c].m[i] + std::log(state[c].l[i]);
    }
    from_lanes(state[c], DV, dst);
  }
}

}  // namespace

// Adds each row's prefix levels to out (B, H, DV) and lse (B, H), which hold its attention over
// its own blocks (from paged_decode), in place: the levels' partial results merged by their
// log-sum-exp.
void attend_prefix_levels(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                          at::Tensor out, at::Tensor lse, at::Tensor level_tables,
                          at::Tensor level_lengths, at::Tensor level_row_ptr,
                          at::Tensor level_rows, int64_t block_size, double scale,
                          at::Tensor level_starts, at::Tensor positions, int64_t window,
                          double softcap) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_pool.size(1);
  const int64_t DV = v_pool.size(2);
  TORCH_CHECK(q.dtype() == at::kFloat && q.stride(2) == 1 && q.stride(1) == D,
              "attend_prefix_levels: fp32 q with each row's heads contiguous");
  for (const auto& t : {k_pool, out, lse})
    TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous(),
                "attend_prefix_levels: contiguous fp32 tensors only");
  TORCH_CHECK(value_pool_ok(k_pool, v_pool) && out.size(2) == DV,
              "attend_prefix_levels: V must be its own pool or K's first lanes, out of its width");
  for (const auto& t :
       {level_tables, level_lengths, level_row_ptr, level_rows, level_starts, positions})
    TORCH_CHECK(t.dtype() == at::kLong && t.is_contiguous(),
                "attend_prefix_levels: contiguous int64 index tensors only");
  const int64_t L = level_lengths.size(0), R = level_rows.size(0);
  TORCH_CHECK(level_row_ptr.size(0) == L + 1 && level_tables.size(0) == L,
              "attend_prefix_levels: level arrays of different lengths");
  TORCH_CHECK(window >= 0 && softcap >= 0, "attend_prefix_levels: a negative window or soft-cap");
  TORCH_CHECK(window == 0 || (level_starts.size(0) == L && positions.size(0) == B),
              "attend_prefix_levels: a window needs each level's start and each row's position");
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(level_rows.data_ptr<int64_t>()[i] >= 0 && level_rows.data_ptr<int64_t>()[i] < B,
                "attend_prefix_levels: a level row outside the batch");
  Levels p{q.data_ptr<float>(),
           q.stride(0),
           k_pool.data_ptr<float>(),
           v_pool.data_ptr<float>(),
           level_tables.data_ptr<int64_t>(),
           level_lengths.data_ptr<int64_t>(),
           level_row_ptr.data_ptr<int64_t>(),
           level_rows.data_ptr<int64_t>(),
           window ? level_starts.data_ptr<int64_t>() : nullptr,
           window ? positions.data_ptr<int64_t>() : nullptr,
           H,
           KVH,
           H / KVH,
           D,
           level_tables.size(1),
           block_size,
           KVH * D,
           DV,
           v_pool.stride(0),
           v_pool.stride(1),
           static_cast<float>(scale),
           window,
           static_cast<float>(softcap)};

  std::vector<LevelPiece> pieces;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t chunks = ((p.row_ptr[l + 1] - p.row_ptr[l]) * p.G + kLanes - 1) / kLanes;
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t c = 0; c < chunks; c += kChunksPerPiece)
        pieces.push_back({l, h, c, std::min(chunks, c + kChunksPerPiece)});
  }
  // Per level_rows slot, every element written by its piece.
  std::unique_ptr<float[]> part_out(new float[R * H * DV]), part_lse(new float[R * H]);
  std::atomic<int64_t> next{0};
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch(D, DV);
    for (int64_t i = next++; i < num_pieces; i = next++)
      with_head_size(D, DV, [&](auto kD) {
        attend_level_piece<decltype(kD)::value>(p, pieces[i], scratch, part_out.get(),
                                                part_lse.get());
      });
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
        float* o = op + (b * H + h) * DV;
        const float w_own = std::exp(lp[b * H + h] - top);
        float total = w_own;
        for (int64_t d = 0; d < DV; ++d) o[d] *= w_own;
        for (int64_t i = slot_ptr[b]; i < slot_ptr[b + 1]; ++i) {
          const float w = std::exp(part_lse[slots[i] * H + h] - top);
          const float* po = part_out.get() + (slots[i] * H + h) * DV;
          total += w;
#pragma omp simd
          for (int64_t d = 0; d < DV; ++d) o[d] += w * po[d];
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < DV; ++d) o[d] *= inv;
        lp[b * H + h] = top + std::log(total);
      }
    }
  });
}
