// Fused element-wise ops of a decoder layer (CPU, fp32), after vLLM's CPU `_C` ops: RMSNorm
// (plain, in place on strided heads, and fused with the residual add), SiLU- and GELU-and-mul
// (SwiGLU, GeGLU) and in-place rotary embedding; and the greedy sampler's row argmax (with
// lm_head_argmax.cpp, its fused output projection). Built at first use by
// prefixbatch/execution/fused_ops.py; the plain PyTorch path in layers.py is what each op is
// tested against. Loops are plain and marked `omp simd` so the compiler vectorises them for
// whatever this CPU has (the build uses -march=native).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>  // the bindings; not torch/extension.h: 3x its compile time

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// Floats of work per parallel task: smaller batches run on the calling thread, since waking
// another one costs more than such a batch takes.
constexpr int64_t kGrainFloats = 32768;

int64_t grain(int64_t floats_per_item) {
  return std::max<int64_t>(1, kGrainFloats / std::max<int64_t>(floats_per_item, 1));
}

void check_fp32(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": fp32 only");
  TORCH_CHECK(t.stride(-1) == 1, op, ": the last dimension must be contiguous");
}

// 1 / RMS of x (D,), the statistic in fp32.
inline float inv_rms(const float* x, int64_t D, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
  return 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
}

// out (D,) = x * inv * w; out may be x.
inline void scale_row(const float* x, const float* w, float inv, float* out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = x[d] * inv * w[d];
}

// RMSNorm of every D-row of x (T, D) or (T, H, D) into out of the same shape; either may be a
// strided view (last dimension contiguous) and out may be x.
void norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps,
               at::Tensor& out) {
  check_fp32(x, "rms_norm");
  check_fp32(out, "rms_norm");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rms_norm: x must be (T, D) or (T, H, D)");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(-1),
              "rms_norm: weight must be contiguous (D,)");
  const int64_t T = x.size(0), D = x.size(-1), H = x.dim() == 3 ? x.size(1) : 1;
  const int64_t xs0 = x.stride(0), xs1 = x.dim() == 3 ? x.stride(1) : 0;
  const int64_t os0 = out.stride(0), os1 = out.dim() == 3 ? out.stride(1) : 0;
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float* row = xp + t * xs0 + h * xs1;
        scale_row(row, w, inv_rms(row, D, e), op + t * os0 + h * os1, D);
      }
    }
  });
}

}  // namespace

// x (T, D) or (T, H, D), any row strides -> RMSNorm(x) * weight, contiguous.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  auto out = at::empty(x.sizes(), x.options());
  norm_rows(x, weight, eps, out);
  return out;
}

// x (T, D) or (T, H, D), any row strides: x = RMSNorm(x) * weight in place (Qwen3's per-head
// q/k norm on views into the fused qkv output).
void rms_norm_(at::Tensor x, at::Tensor weight, double eps) { norm_rows(x, weight, eps, x); }

// x, residual (T, D) contiguous, in place: residual += x, then x = RMSNorm(residual) * weight.
void fused_add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight,
                         double eps) {
  check_fp32(x, "fused_add_rms_norm_");
  check_fp32(residual, "fused_add_rms_norm_");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() &&
                  x.sizes() == residual.sizes(),
              "fused_add_rms_norm_: x and residual must be contiguous (T, D) of one shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1),
              "fused_add_rms_norm_: weight must be contiguous (D,)");
  const int64_t T = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* xr = xp + t * D;
      float* rr = rp + t * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) {
        const float r = rr[d] + xr[d];
        rr[d] = r;
        ss += r * r;
      }
      scale_row(rr, w, 1.f / std::sqrt(ss / static_cast<float>(D) + e), xr, D);
    }
  });
}

namespace {

// gate_up (T, 2I) contiguous, gate then up -> act(gate) * up (T, I).
template <class Act>
at::Tensor act_and_mul(const at::Tensor& gate_up, const char* op, Act act) {
  check_fp32(gate_up, op);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, op,
              ": gate_up must be contiguous (T, 2I)");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, T, grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = in + t * 2 * I;
      const float* u = g + I;
      float* o = op_ + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = act(g[i]) * u[i];
    }
  });
  return out;
}

}  // namespace

// gate_up (T, 2I) contiguous, gate then up -> silu(gate) * up (T, I).
at::Tensor silu_and_mul(at::Tensor gate_up) {
  // exp's argument is capped so it stays finite (-ffast-math assumes no infinities); past the
  // cap silu(g) is below 1e-33 either way.
  return act_and_mul(gate_up, "silu_and_mul",
                     [](float g) { return g / (1.f + std::exp(std::min(-g, 80.f))); });
}

// gate_up (T, 2I) contiguous, gate then up -> gelu(gate) * up (T, I), gelu's tanh approximation
// 0.5 g (1 + tanh(z)), z = sqrt(2 / pi) (g + 0.044715 g^3) (PyTorch's approximate="tanh":
// GeGLU), computed as g / (1 + exp(-2z)) (1 + tanh(z) = 2 sigmoid(2z): no cancellation).
at::Tensor gelu_tanh_and_mul(at::Tensor gate_up) {
  return act_and_mul(gate_up, "gelu_tanh_and_mul", [](float g) {
    const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return g / (1.f + std::exp(std::min(-2.f * z, 80.f)));
  });
}

namespace {

// Rotates the H heads of one token, x (H, D) with head stride hs, by cos/sin (D/2,).
inline void rotate_heads(float* x, int64_t H, int64_t hs, int64_t half, const float* c,
                         const float* s) {
  for (int64_t h = 0; h < H; ++h) {
    float* x1 = x + h * hs;
    float* x2 = x1 + half;
#pragma omp simd
    for (int64_t d = 0; d < half; ++d) {
      const float a = x1[d], b = x2[d];
      x1[d] = a * c[d] - b * s[d];
      x2[d] = b * c[d] + a * s[d];
    }
  }
}

}  // namespace

// Non-interleaved ("rotate half") RoPE in place: q (T, H, D) and k (T, KVH, D), any token and
// head strides (views into the fused qkv output), by per-token cos, sin (T, D/2) contiguous.
void rotary_embedding_(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin) {
  check_fp32(q, "rotary_embedding_");
  check_fp32(k, "rotary_embedding_");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "rotary_embedding_: q (T, H, D) and k (T, KVH, D) expected");
  const int64_t T = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "rotary_embedding_: even head size expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * half &&
                  sin.numel() == T * half,
              "rotary_embedding_: cos and sin must be contiguous fp32 (T, D/2)");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  at::parallel_for(0, T, grain((H + KVH) * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      rotate_heads(qp + t * qs0, H, qs1, half, c, s);
      rotate_heads(kp + t * ks0, KVH, ks1, half, c, s);
    }
  });
}

// 16 floats: one AVX-512 register, two AVX2 ones.
typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));

inline V16 load16(const float* p) {
  V16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

// The first index of the largest value of row (V,), or 0 when no value equals it (a row of
// -inf, which -ffast-math comparisons may not match).
inline int64_t argmax_row(const float* row, int64_t V) {
  V16 top = V16{} + row[0];
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const V16 x = load16(row + i);
    top = x > top ? x : top;
  }
  float m = row[0];
  for (int j = 0; j < 16; ++j) m = std::max(m, top[j]);
  for (; i < V; ++i) m = std::max(m, row[i]);
  // Its first occurrence: 64 values compared at once until a span holds it, then scanned.
  for (i = 0; i + 64 <= V; i += 64) {
    const I16 hit = (load16(row + i) == m) | (load16(row + i + 16) == m) |
                    (load16(row + i + 32) == m) | (load16(row + i + 48) == m);
    int any = 0;
    for (int j = 0; j < 16; ++j) any |= hit[j];
    if (any) break;
  }
  while (i < V && row[i] != m) ++i;
  return i < V ? i : 0;
}

// Index of the first largest value of each row of x (S, V), contiguous -> (S,) int64: what
// torch.argmax gives for rows without NaN, from two vectorised passes over the row (torch's CPU
// argmax tracks the index in a scalar loop, ~10x slower).
at::Tensor argmax_rows(at::Tensor x) {
  check_fp32(x, "argmax_rows");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "argmax_rows: contiguous (S, V) with V > 0 expected");
  const int64_t S = x.size(0), V = x.size(1);
  auto out = at::empty({S}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, S, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * V, V);
  });
  return out;
}

// lm_head_argmax.cpp, built into the same module.
at::Tensor lm_head_argmax(at::Tensor x, at::Tensor w);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of (T, D) or (T, H, D) rows into a new tensor");
  m.def("rms_norm_", &rms_norm_, "RMSNorm of (T, D) or (T, H, D) rows in place");
  m.def("fused_add_rms_norm_", &fused_add_rms_norm_, "residual += x; x = RMSNorm(residual)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of (T, 2I) gate_up");
  m.def("gelu_tanh_and_mul", &gelu_tanh_and_mul, "gelu_tanh(gate) * up of (T, 2I) gate_up");
  m.def("rotary_embedding_", &rotary_embedding_, "rotate-half RoPE of q and k in place");
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum");
  m.def("lm_head_argmax", &lm_head_argmax, "first index of each row's largest logit x @ w^T");
}
