// exp over GCC vector types, for the attention kernels' online softmax (both built with
// -ffast-math, which assumes no infinities; scores use a finite stand-in for -inf), and tanh on
// it, for soft-capped scores.
#pragma once

#include <cstring>

// exp(x) lane-wise for a float vector type V and the int32 vector type IV of the same lane
// count, 0 below -87: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, and Cephes' expf
// polynomial for e^r (relative error ~1e-7).
template <class V, class IV>
inline V vector_exp(V x) {
  const V lo = V{} - 87.f, hi = V{} + 88.f;
  const V xc = x < lo ? lo : (x > hi ? hi : x);
  const IV n = __builtin_convertvector(xc * 1.44269504f + 128.5f, IV) - 128;  // floor(+0.5)
  const V nf = __builtin_convertvector(n, V);
  const V r = xc - nf * 0.693359375f - nf * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IV bits = (n + 127) << 23;  // 2^n as a float's exponent field
  V pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return x < lo ? V{} : p * pow2;
}

// tanh(x) lane-wise: sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|) in (0, 1], so nothing
// overflows; absolute error ~2e-7 (relative error larger only where tanh is near 0).
template <class V, class IV>
inline V vector_tanh(V x) {
  const V ax = x < V{} ? -x : x;
  const V e = vector_exp<V, IV>(ax * -2.f);
  const V one = V{} + 1.f;
  const V t = (one - e) / (one + e);
  return x < V{} ? -t : t;
}
