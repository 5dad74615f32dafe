// Decode attention read straight from the paged KV pool (CPU, fp32): one query token per
// sequence, no gather copy of the context. Built at first use by prefixbatch/execution/attention/
// native.py; the plain PyTorch path in reference.py is what it is tested against.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Finite stand-in for -inf: the build uses -ffast-math, which assumes no infinities.
constexpr float kNegBig = -1e30f;

}  // namespace

// q (B, H, D); k_pool, v_pool (slots, KVH, D) of one layer; block_tables (B, NB) int64 with a
// sequence's blocks in position order; lengths (B,) int64 positions attended (>= 1).
// Returns out (B, H, D) and the log-sum-exp of the scores, lse (B, H).
//
// Work items are (sequence, KV head) pairs, sequence-major: the heads of one sequence run back to
// back on one thread and consume each token's K/V row (KVH * D floats, contiguous) whole, which
// streams from memory ~20% faster than a head-major sweep. Members of a prefix group sit next to
// each other in the batch, so the shared prefix blocks come from DRAM once and from cache after.
// The G query heads of a KV head are computed together, so each K and V row is loaded once for
// them. Softmax is online over blocks (running max and sum).
std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor k_pool,
                                        torch::Tensor v_pool, torch::Tensor block_tables,
                                        torch::Tensor lengths, int64_t block_size,
                                        double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_pool.dtype() == torch::kFloat32 &&
                  v_pool.dtype() == torch::kFloat32,
              "paged_decode: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  block_tables.is_contiguous() && lengths.is_contiguous(),
              "paged_decode: contiguous tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_pool.size(1), G = H / KVH, NB = block_tables.size(1);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({B, H}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t tok_stride = KVH * D;  // floats between consecutive slots of the pool

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * block_size), acc(G * D), m(G), l(G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH;
      const float* qs = qp + (b * H + h * G) * D;  // the G query heads of KV head h
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegBig);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t n_ctx = len[b];
      for (int64_t j = 0; j * block_size < n_ctx; ++j) {
        const int64_t n = std::min(block_size, n_ctx - j * block_size);
        const float* kb = kp + bt[b * NB + j] * block_size * tok_stride + h * D;
        const float* vb = vp + bt[b * NB + j] * block_size * tok_stride + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs + g * D;
          float* sg = s.data() + g * block_size;
          float block_max = kNegBig;
          for (int64_t t = 0; t < n; ++t) {
            const float* kt = kb + t * tok_stride;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
            sg[t] = dot * sc;
            block_max = std::max(block_max, sg[t]);
          }
          const float new_max = std::max(m[g], block_max);
          const float correction = std::exp(m[g] - new_max);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            sg[t] = std::exp(sg[t] - new_max);
            sum += sg[t];
          }
          l[g] = l[g] * correction + sum;
          m[g] = new_max;
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
        }
        for (int64_t t = 0; t < n; ++t) {
          const float* vt = vb + t * tok_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * block_size + t];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * vt[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + h * G + g) * D;
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
        lp[b * H + h * G + g] = m[g] + std::log(l[g]);
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV pool");
}
