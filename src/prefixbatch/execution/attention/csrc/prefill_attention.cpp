// Prefill-chunk attention on the CPU, fp32, read straight from the paged KV pool: each chunk's
// queries attend causally to every position of their sequence up to their own (the prefix
// included), without gathering the context into a contiguous copy first. Tested against the
// plain PyTorch path in reference.py (SDPA per chunk, through the CPU backend).
//
// Why not SDPA: its CPU kernel takes the chunk's causal offset only as an explicit mask, so it
// computes every (query, key) tile, masked ones too, and needs the context gathered first. Here
// the query heads of a chunk sit in vector lanes (lane_attention.h; lane i: query row i / G,
// query head i % G of the KV head), each lane chunk walks its keys only up to its last query's
// position, and tiles past a chunk's first query position are masked lane by lane. With a sliding
// window each lane also sees only its last `window` positions: a chunk starts its walk at its
// first lane's window and masks the tiles where some lane's window begins. Scores may be
// soft-capped (softcap > 0). Attention sinks (gpt-oss: one logit per query head in every
// softmax denominator, attending no value) start each lane's online softmax at m = sink, l = 1.
//
// Layout. q (T, H, D) with each row's heads contiguous (row stride free: q may be a view into
// the fused qkv output); k_pool (slots, KVH, D), v_pool (slots, KVH, DV) (its own pool or K's
// first lanes); out (T, H, DV) contiguous, written at the chunks' rows only. Per chunk s: block_tables[s] (S, NB) int64, its query rows [q_start[s], + q_len[s])
// at positions [context_len[s] - q_len[s], context_len[s]).
// ATen headers only: the bindings (and the heavy torch/extension.h) are in paged_decode.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "lane_attention.h"
#include "value_pool.h"

namespace {

using namespace lanes;

struct Prefill {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* tables;
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* context_len;
  float* out;
  int64_t q_row_stride, H, G, D, NB, block_size, tok_stride;
  int64_t DV, v_tok_stride, v_head_stride;  // V's lanes and strides
  float scale;
  int64_t window;  // 0: none
  float softcap;   // 0: none
  const float* sinks;  // (H,) or null: none
};

// Lane chunks [first_chunk, end_chunk) of chunk `seq`'s query heads of KV head `head`.
struct Piece {
  int64_t seq, head, first_chunk, end_chunk;
};

template <int kD>
void attend_piece(const Prefill& p, const Piece& piece, Scratch& scratch) {
  const int64_t D = kD ? kD : p.D, DV = kD ? kD : p.DV;
  const int64_t s = piece.seq, q_start = p.q_start[s], lanes = p.q_len[s] * p.G;
  const int64_t first_pos = p.context_len[s] - p.q_len[s];
  const int64_t chunks = piece.end_chunk - piece.first_chunk;
  ChunkState state[kChunksPerPiece];
  IVec position[kChunksPerPiece];  // each lane's query position
  IVec low[kChunksPerPiece];       // each lane's first visible position
  int64_t lo[kChunksPerPiece], hi[kChunksPerPiece];  // a chunk's first and last query position
  // With a window: the first position a chunk's first lane sees, and one its last lane sees.
  int64_t see_from[kChunksPerPiece], all_see[kChunksPerPiece];
  float* dst[kChunksPerPiece][kLanes];
  const int64_t window = p.window;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = (piece.first_chunk + c) * kLanes;
    const float* src[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const int64_t lane = std::min(first + i, lanes - 1);  // past the end: a copy, not written
      const int64_t row = q_start + lane / p.G, head = piece.head * p.G + lane % p.G;
      const bool real = first + i < lanes;
      src[i] = real ? p.q + row * p.q_row_stride + head * D : nullptr;
      dst[c][i] = real ? p.out + (row * p.H + head) * DV : nullptr;
      position[c][i] = static_cast<int32_t>(first_pos + lane / p.G);
      low[c][i] = window ? position[c][i] - static_cast<int32_t>(window) + 1 : kNoLow;
    }
    lo[c] = first_pos + first / p.G;
    hi[c] = first_pos + (std::min(first + kLanes, lanes) - 1) / p.G;
    see_from[c] = window ? lo[c] - window + 1 : 0;
    all_see[c] = window ? hi[c] - window + 1 : 0;
    state[c] = scratch.chunk(c, src, p.scale);
    if (p.sinks)  // the sink as a key seen first: running max sink, sum e^0 = 1, nothing summed
      for (int i = 0; i < kLanes; ++i) {
        state[c].m[i] = p.sinks[piece.head * p.G + std::min(first + i, lanes - 1) % p.G];
        state[c].l[i] = 1.f;
      }
  }
  const int64_t begin = *std::min_element(see_from, see_from + chunks);
  for_each_tile(p.k + piece.head * D, p.v + piece.head * p.v_head_stride, p.tables + s * p.NB,
                begin, *std::max_element(hi, hi + chunks) + 1, p.block_size, p.tok_stride,
                p.v_tok_stride, scratch,
                [&](const float* kt, const float* vt, int64_t pos0, int64_t n) {
                  for (int64_t c = 0; c < chunks; ++c) {
                    // past every query of the chunk, or before every lane's window
                    if (pos0 > hi[c] || pos0 + n - 1 < see_from[c]) continue;
                    if (pos0 + n - 1 <= lo[c] && pos0 >= all_see[c])  // every lane sees it all
                      tile_update<kD, false>(state[c], kt, vt, n, D, DV, p.softcap);
                    else
                      tile_update<kD, true>(state[c], kt, vt, n, D, DV, p.softcap, pos0, low[c],
                                            position[c]);
                  }
                });
  for (int64_t c = 0; c < chunks; ++c) from_lanes(state[c], DV, dst[c]);
}

}  // namespace

// Fills out's rows of every prefill chunk with its causal attention over its sequence's
// positions [0, context_len) (the last `window` up to each query's, for window > 0), scores
// soft-capped for softcap > 0, with the sinks (H,) fp32 in every denominator unless empty.
void prefill_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                       at::Tensor out, at::Tensor block_tables, at::Tensor q_start,
                       at::Tensor q_len, at::Tensor context_len, int64_t block_size,
                       double scale, int64_t window, double softcap, at::Tensor sinks) {
  const int64_t H = q.size(1), D = q.size(2), KVH = k_pool.size(1), DV = v_pool.size(2);
  TORCH_CHECK(q.dtype() == at::kFloat && q.stride(2) == 1 && q.stride(1) == D,
              "prefill_attention: fp32 q with each row's heads contiguous");
  for (const auto& t : {k_pool, out})
    TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous(),
                "prefill_attention: contiguous fp32 pools and output");
  TORCH_CHECK(value_pool_ok(k_pool, v_pool) && out.size(2) == DV,
              "prefill_attention: V must be its own pool or K's first lanes, out of its width");
  for (const auto& t : {block_tables, q_start, q_len, context_len})
    TORCH_CHECK(t.dtype() == at::kLong && t.is_contiguous(),
                "prefill_attention: contiguous int64 index tensors");
  TORCH_CHECK(sinks.numel() == 0 || (sinks.dtype() == at::kFloat && sinks.is_contiguous() &&
                                      sinks.numel() == H),
              "prefill_attention: sinks must be empty or contiguous fp32 (H,)");
  const int64_t S = q_len.size(0);
  Prefill p{q.data_ptr<float>(),
            k_pool.data_ptr<float>(),
            v_pool.data_ptr<float>(),
            block_tables.data_ptr<int64_t>(),
            q_start.data_ptr<int64_t>(),
            q_len.data_ptr<int64_t>(),
            context_len.data_ptr<int64_t>(),
            out.data_ptr<float>(),
            q.stride(0),
            H,
            H / KVH,
            D,
            block_tables.size(1),
            block_size,
            KVH * D,
            DV,
            v_pool.stride(0),
            v_pool.stride(1),
            static_cast<float>(scale),
            window,
            static_cast<float>(softcap),
            sinks.numel() ? sinks.data_ptr<float>() : nullptr};
  TORCH_CHECK(window >= 0 && softcap >= 0, "prefill_attention: a negative window or soft-cap");
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(p.q_len[s] >= 1 && p.q_len[s] <= p.context_len[s] &&
                    p.q_start[s] + p.q_len[s] <= q.size(0) &&
                    p.context_len[s] <= p.NB * block_size,
                "prefill_attention: a chunk outside q or its block table");
  // Later lane chunks attend to more positions: they go first, so the last pieces taken are
  // the short ones and the threads finish together.
  std::vector<Piece> pieces;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t chunks = (p.q_len[s] * p.G + kLanes - 1) / kLanes;
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t c = 0; c < chunks; c += kChunksPerPiece)
        pieces.push_back({s, h, c, std::min(chunks, c + kChunksPerPiece)});
  }
  std::sort(pieces.begin(), pieces.end(), [&](const Piece& a, const Piece& b) {
    const int64_t end_a = p.context_len[a.seq] - p.q_len[a.seq] + a.end_chunk * kLanes / p.G;
    const int64_t end_b = p.context_len[b.seq] - p.q_len[b.seq] + b.end_chunk * kLanes / p.G;
    return end_a > end_b;
  });
  std::atomic<int64_t> next{0};
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch(D, DV);
    for (int64_t i = next++; i < num_pieces; i = next++)
      with_head_size(D, DV,
                     [&](auto kD) { attend_piece<decltype(kD)::value>(p, pieces[i], scratch); });
  });
}
