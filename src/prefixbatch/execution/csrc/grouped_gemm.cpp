// Grouped GEMM of a mixture-of-experts layer on the CPU: rows sorted by expert, each expert's
// slice times its own weight, all in one parallel region. One multithreaded GEMM per expert
// instead (a few rows each in a decode step) starts and joins the thread team once per expert,
// and every join waits for the slowest thread: with other processes holding the 2 cores, 32
// GEMMs of 16 x 512 x 512 took 300 ms as 32 two-thread calls and 19 ms as one region (17 ms
// either way on one thread). Each thread runs whole tiles of rows through ATen's GEMM,
// single-threaded inside the region. Built at first use by prefixbatch/execution/moe/
// cpu_experts.py; the per-expert PyTorch loop in moe/experts.py is what it is tested against.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>  // the bindings; not torch/extension.h: 3x its compile time

#include <vector>

namespace {

// Rows per task: an expert with more rows is split, so that one busy expert spreads over the
// threads (prefill), while a decode step's few rows per expert stay one task each.
constexpr int64_t kTileRows = 64;

struct Tile {
  int64_t expert, start, rows;
};

}  // namespace

// out (N, O) = rows (N, K) x weights[e] (E, K, O) for each expert e's slice of rows, the slices
// in expert order with counts (E,) int64 rows each (sum = N). out must not alias rows.
void grouped_mm_(at::Tensor out, const at::Tensor& rows, const at::Tensor& weights,
                 const at::Tensor& counts) {
  TORCH_CHECK(rows.dim() == 2 && weights.dim() == 3 && out.dim() == 2, "grouped_mm_: shapes");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() &&
                  counts.device().is_cpu() && counts.numel() == weights.size(0),
              "grouped_mm_: counts must be (E,) int64 on the CPU");
  TORCH_CHECK(rows.size(1) == weights.size(1) && out.size(1) == weights.size(2) &&
                  out.size(0) == rows.size(0),
              "grouped_mm_: rows (N, K), weights (E, K, O), out (N, O)");
  const int64_t* count = counts.data_ptr<int64_t>();
  std::vector<Tile> tiles;
  int64_t start = 0;
  for (int64_t e = 0; e < counts.numel(); ++e) {
    for (int64_t s = 0; s < count[e]; s += kTileRows) {
      tiles.push_back({e, start + s, std::min(kTileRows, count[e] - s)});
    }
    start += count[e];
  }
  TORCH_CHECK(start == rows.size(0), "grouped_mm_: counts must sum to the rows");
  // Inference mode is per thread: the team's threads take the caller's.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    for (int64_t i = begin; i < end; ++i) {
      const Tile& t = tiles[i];
      auto target = out.narrow(0, t.start, t.rows);
      at::mm_out(target, rows.narrow(0, t.start, t.rows), weights[t.expert]);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_mm_", &grouped_mm_, "out[slice e] = rows[slice e] @ weights[e], one region");
}
