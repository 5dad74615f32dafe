// The step's new K and V rows stored into one layer's paged pools (CPU, fp32) in one call: what
// two index_copy_ calls do, without their dispatch and with k and v read in place from the fused
// qkv output. AttentionBackend.write_kv is the plain path it replaces.
// ATen headers only: the bindings (and the heavy torch/extension.h) are in paged_decode.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>

#include <cstring>

// k_pool[slots[t]] = k[t] and v_pool[slots[t]] = v[t] for every row t; k and v (T, KVH, D) with
// each row's heads contiguous (rows may be strided), pools (slots, KVH, D) contiguous.
void write_kv(at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots, at::Tensor k,
              at::Tensor v) {
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2), row = KVH * D;
  for (const auto& t : {k, v})
    TORCH_CHECK(t.dtype() == at::kFloat && t.stride(2) == 1 && t.stride(1) == D,
                "write_kv: fp32 k and v with each row's heads contiguous");
  for (const auto& t : {k_pool, v_pool})
    TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous() && t.size(1) == KVH &&
                    t.size(2) == D,
                "write_kv: contiguous fp32 pools of k's head shape");
  TORCH_CHECK(slots.dtype() == at::kLong && slots.is_contiguous() && slots.size(0) == T,
              "write_kv: one int64 slot per row");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_pool.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "write_kv: a slot outside the pool");
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const float* kr = k.data_ptr<float>();
  const float* vr = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  // A decode step's few rows are copied on the calling thread; prefill chunks in parallel.
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kp + slot[t] * row, kr + t * ks, row * sizeof(float));
      std::memcpy(vp + slot[t] * row, vr + t * vs, row * sizeof(float));
    }
  });
}
