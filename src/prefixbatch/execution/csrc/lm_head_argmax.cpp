// The greedy sampler's output projection and argmax in one pass (CPU, fp32): for hidden states
// x (S, K) and the lm_head weight w (V, K), the first index of each row's largest logit
// x @ w^T, without writing the (S, V) logits. Built into the module of elementwise.cpp
// (prefixbatch/execution/fused_ops.py); tested against torch.mm and torch.argmax.
//
// A decode step of 1,024 rows over a 49,152-token vocabulary makes 200 MB of logits: the
// GEMM writes them to memory and the argmax reads them back, both bound by memory bandwidth
// when the hidden size is small (128: 153 ms on two AVX2 cores, against 67 ms here). Here
// each tile of logits lives in registers: MR rows (packed, K x MR) times NR vocabulary entries,
// accumulated over K with FMAs (the register blocking of BLIS/GotoBLAS micro-kernels), then
// folded into each row's running (max, index). Threads split the vocabulary; each keeps its
// own running maxima, merged in vocabulary order at the end. Loop order per thread: rows in
// chunks that stay in L2, vocabulary in tiles that stay in L2, then row blocks, then NR-wide
// micro-tiles.
//
// Ties: the first index of the largest value, as torch.argmax; a logit is compared with `>`
// while the vocabulary is walked upwards. Sums run in another order than a BLAS GEMM's, so a
// row whose two largest logits are within rounding of each other may pick the other one.
// Rows must not hold NaN (as the sampler's argmax_rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
#else
constexpr int kLanes = 8;
#endif
typedef float VF __attribute__((vector_size(kLanes * 4)));
typedef int32_t VI __attribute__((vector_size(kLanes * 4)));

constexpr int MR = 2 * kLanes;  // rows per micro-tile: two registers
constexpr int NR = 6;           // vocabulary entries per micro-tile: 12 accumulators
constexpr int64_t kTileBytes = 128 << 10;   // weight rows per vocabulary tile (L2)
constexpr int64_t kChunkBytes = 1 << 20;    // packed hidden rows per row chunk (L2)
constexpr int64_t kMinVocabPerThread = 1024;

inline VF loadf(const float* p) {
  VF x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline VI loadi(const int32_t* p) {
  VI x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void storef(float* p, VF x) { std::memcpy(p, &x, sizeof x); }
inline void storei(int32_t* p, VI x) { std::memcpy(p, &x, sizeof x); }

// The logits of one packed row block xp (K, MR) against N weight rows w (N, K) of vocabulary
// entries v, v + 1, ..., folded into the block's running best (MR,) and index (MR,).
template <int N>
inline void micro_tile(const float* xp, const float* w, int64_t K, int32_t v, float* best,
                       int32_t* index) {
  VF acc[N][2];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = VF{};
  for (int64_t k = 0; k < K; ++k) {
    const VF a0 = loadf(xp + k * MR), a1 = loadf(xp + k * MR + kLanes);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const VF b = VF{} + w[j * K + k];
      acc[j][0] += a0 * b;
      acc[j][1] += a1 * b;
    }
  }
  VF m0 = loadf(best), m1 = loadf(best + kLanes);
  VI i0 = loadi(index), i1 = loadi(index + kLanes);
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    const VI at = VI{} + (v + j);
    const VI g0 = acc[j][0] > m0, g1 = acc[j][1] > m1;
    m0 = g0 ? acc[j][0] : m0;
    i0 = g0 ? at : i0;
    m1 = g1 ? acc[j][1] : m1;
    i1 = g1 ? at : i1;
  }
  storef(best, m0);
  storef(best + kLanes, m1);
  storei(index, i0);
  storei(index + kLanes, i1);
}

void micro_tile_n(int64_t n, const float* xp, const float* w, int64_t K, int32_t v, float* best,
                  int32_t* index) {
  switch (n) {
    case 1: return micro_tile<1>(xp, w, K, v, best, index);
    case 2: return micro_tile<2>(xp, w, K, v, best, index);
    case 3: return micro_tile<3>(xp, w, K, v, best, index);
    case 4: return micro_tile<4>(xp, w, K, v, best, index);
    case 5: return micro_tile<5>(xp, w, K, v, best, index);
    default: return micro_tile<NR>(xp, w, K, v, best, index);
  }
}

}  // namespace

at::Tensor lm_head_argmax(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "lm_head_argmax: fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.stride(1) == 1,
              "lm_head_argmax: x (S, K) with contiguous rows and w (V, K) expected");
  TORCH_CHECK(w.is_contiguous() && w.size(0) > 0 && w.size(0) <= INT32_MAX,
              "lm_head_argmax: a contiguous weight of 1 to 2^31 - 1 rows expected");
  const int64_t S = x.size(0), K = x.size(1), V = w.size(0), xs = x.stride(0);
  auto out = at::empty({S}, x.options().dtype(at::kLong));
  if (S == 0) return out;
  // x packed by blocks of MR rows, each (K, MR) with its rows side by side (zero rows pad the
  // last block).
  const int64_t blocks = (S + MR - 1) / MR;
  std::vector<float> packed(blocks * K * MR, 0.f);
  const float* xd = x.data_ptr<float>();
  for (int64_t r = 0; r < S; ++r) {
    float* dst = packed.data() + (r / MR) * K * MR + r % MR;
    const float* src = xd + r * xs;
    for (int64_t k = 0; k < K; ++k) dst[k * MR] = src[k];
  }
  const float* wd = w.data_ptr<float>();
  const int64_t parts = std::clamp<int64_t>(V / kMinVocabPerThread, 1, at::get_num_threads());
  const int64_t padded = blocks * MR;
  std::vector<float> best(parts * padded, std::numeric_limits<float>::lowest());
  std::vector<int32_t> index(parts * padded, 0);
  const int64_t tile = std::max<int64_t>(NR, kTileBytes / (K * 4) / NR * NR);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (K * MR * 4));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t v0 = V * p / parts, v1 = V * (p + 1) / parts;
      float* bp = best.data() + p * padded;
      int32_t* ip = index.data() + p * padded;
      for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
        const int64_t b1 = std::min(blocks, b0 + chunk);
        for (int64_t t0 = v0; t0 < v1; t0 += tile) {
          const int64_t t1 = std::min(v1, t0 + tile);
          for (int64_t b = b0; b < b1; ++b) {
            const float* xp = packed.data() + b * K * MR;
            for (int64_t v = t0; v < t1; v += NR)
              micro_tile_n(std::min<int64_t>(NR, t1 - v), xp, wd + v * K, K,
                           static_cast<int32_t>(v), bp + b * MR, ip + b * MR);
          }
        }
      }
    }
  });
  // Parts in vocabulary order: a later part wins only with a strictly larger logit. (The
  // running maxima start at the lowest finite float, not -inf: the build's -ffast-math assumes
  // finite values.)
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < S; ++r) {
    float top = best[r];
    int32_t at = index[r];
    for (int64_t p = 1; p < parts; ++p) {
      if (best[p * padded + r] > top) {
        top = best[p * padded + r];
        at = index[p * padded + r];
      }
    }
    o[r] = at;
  }
  return out;
}
