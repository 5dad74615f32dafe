// The V pool the CPU attention kernels read: (slots, KVH, DV) fp32, DV <= D, either a contiguous
// pool of its own or a view of the K pool's first DV lanes (multi-head latent attention keeps the
// value inside the key and stores it once: V's slots and heads then step as K's do). Kernels take
// V's slot and head strides from the tensor.
#pragma once

#include <ATen/core/Tensor.h>

inline bool value_pool_ok(const at::Tensor& k_pool, const at::Tensor& v_pool) {
  if (v_pool.dtype() != at::kFloat || v_pool.dim() != 3 || v_pool.size(0) != k_pool.size(0) ||
      v_pool.size(1) != k_pool.size(1) || v_pool.size(2) > k_pool.size(2) ||
      v_pool.stride(2) != 1)
    return false;
  if (v_pool.is_contiguous()) return true;
  return v_pool.data_ptr() == k_pool.data_ptr() && v_pool.stride(0) == k_pool.stride(0) &&
         v_pool.stride(1) == k_pool.stride(1);
}
