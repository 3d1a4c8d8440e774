// Every row's own low-rank delta, added in place: one call per linear layer (lowrank_rows) or per
// embedding lookup (lowrank_embed) for a batch that mixes variants of one base. The plan (directions, their
// scales, columns and rows' ranges) is built and bounds-checked by workers/generation/lowrank_kernel.py;
// workers/generation/deltas.py explains the factors.
//
// A plan of J directions for R request rows: a (J x in) int8; bvals int8; ints = [bstart (J), off (J),
// width (J), c0 (R), c1 (R)] int64; scales = [sa (J), sb (J)] float32. Direction j has the int8 column
// b_j = bvals[bstart[j] : bstart[j] + width[j]], placed at output offset off[j]; request row r uses
// directions c0[r] .. c1[r] - 1. With q positions per request row, activation row m belongs to r = m / q.
//
// lowrank_rows:  y[m, off[j] : off[j] + width[j]] += (sa[j] sb[j] <a[j], x[m]>) b_j
// lowrank_embed: h[m, :] += (sa[j] sb[j] b_j[ids[m]]) a[j]                 (an embedding delta B A: row id)
// Sums are accumulated in float32 and rounded to bfloat16 once (nearest even).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "bf16.h"

#include <cstring>
#include <vector>

namespace {

// dst[i] += acc[i] for a bfloat16 row, the sum rounded once
inline void add_to_bf16_row(uint16_t* dst, const float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(bf16_to_float(dst[i]) + acc[i]);
}

struct Plan {
  const int8_t* a;
  const int8_t* bvals;
  const int64_t *bstart, *off, *width, *c0, *c1;
  const float *sa, *sb;
  int64_t directions, requests;
};

Plan checked_plan(const torch::Tensor& y, const torch::Tensor& a, const torch::Tensor& bvals,
                  const torch::Tensor& ints, const torch::Tensor& scales, int64_t rows, int64_t q, bool placed) {
  TORCH_CHECK(y.dim() == 2 && a.dim() == 2, "y and a must be matrices");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.is_contiguous(), "y: contiguous bfloat16");
  TORCH_CHECK(a.scalar_type() == at::kChar && bvals.scalar_type() == at::kChar, "a and bvals: int8");
  TORCH_CHECK(ints.scalar_type() == at::kLong && scales.scalar_type() == at::kFloat, "ints int64, scales float");
  TORCH_CHECK(a.is_contiguous() && bvals.is_contiguous() && ints.is_contiguous() && scales.is_contiguous(),
              "contiguous plan");
  const int64_t directions = a.size(0);
  TORCH_CHECK(scales.numel() == 2 * directions, "two scales per direction");
  const int64_t requests = (ints.numel() - 3 * directions) / 2;
  TORCH_CHECK(requests >= 0 && ints.numel() == 3 * directions + 2 * requests, "plan sizes");
  TORCH_CHECK(q > 0 && rows == y.size(0) && rows == requests * q, "rows do not match the plan");
  Plan p;
  p.a = a.data_ptr<int8_t>();
  p.bvals = bvals.data_ptr<int8_t>();
  const int64_t* i = ints.data_ptr<int64_t>();
  p.bstart = i;
  p.off = i + directions;
  p.width = i + 2 * directions;
  p.c0 = i + 3 * directions;
  p.c1 = p.c0 + requests;
  p.sa = scales.data_ptr<float>();
  p.sb = p.sa + directions;
  p.directions = directions;
  p.requests = requests;
  for (int64_t j = 0; j < directions; ++j) {
    TORCH_CHECK(p.bstart[j] >= 0 && p.width[j] >= 0 && p.bstart[j] + p.width[j] <= bvals.numel(),
                "a direction's column lies outside bvals");
    TORCH_CHECK(!placed || (p.off[j] >= 0 && p.off[j] + p.width[j] <= y.size(1)), "a column lies outside y");
  }
  for (int64_t r = 0; r < requests; ++r)
    TORCH_CHECK(0 <= p.c0[r] && p.c0[r] <= p.c1[r] && p.c1[r] <= directions, "a row's directions");
  return p;
}

void lowrank_rows(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bvals, torch::Tensor ints,
                  torch::Tensor scales, int64_t q) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bfloat16");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == x.size(1), "a's columns must be x's");
  const Plan p = checked_plan(y, a, bvals, ints, scales, x.size(0), q, true);
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), acc(out);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t r = m / q;
      const int64_t j0 = p.c0[r], j1 = p.c1[r];
      if (j0 >= j1) continue;
      for (int64_t i = 0; i < in; ++i) xf[i] = bf16_to_float(xp[m * in + i]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = j0; j < j1; ++j) {
        const int8_t* aj = p.a + j * in;
        float dot = 0.f;
        for (int64_t i = 0; i < in; ++i) dot += float(aj[i]) * xf[i];
        const float t = dot * p.sa[j] * p.sb[j];
        const int8_t* bj = p.bvals + p.bstart[j];
        float* dst = acc.data() + p.off[j];
        const int64_t w = p.width[j];
        for (int64_t i = 0; i < w; ++i) dst[i] += t * float(bj[i]);
      }
      add_to_bf16_row(yp + m * out, acc.data(), out);
    }
  });
}

void lowrank_embed(torch::Tensor h, torch::Tensor ids, torch::Tensor a, torch::Tensor bvals, torch::Tensor ints,
                   torch::Tensor scales, int64_t q) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids: int64 vector");
  TORCH_CHECK(a.dim() == 2 && h.dim() == 2 && a.size(1) == h.size(1), "a's columns must be h's");
  const Plan p = checked_plan(h, a, bvals, ints, scales, ids.numel(), q, false);
  const int64_t rows = h.size(0), width = h.size(1);
  const int64_t* idp = ids.data_ptr<int64_t>();
  auto* hp = reinterpret_cast<uint16_t*>(h.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t r = m / q;
    for (int64_t j = p.c0[r]; j < p.c1[r]; ++j) TORCH_CHECK(idp[m] >= 0 && idp[m] < p.width[j], "id out of range");
  }
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(width);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t r = m / q;
      const int64_t j0 = p.c0[r], j1 = p.c1[r];
      if (j0 >= j1) continue;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = j0; j < j1; ++j) {
        const float t = float(p.bvals[p.bstart[j] + idp[m]]) * p.sa[j] * p.sb[j];
        const int8_t* aj = p.a + j * width;
        for (int64_t i = 0; i < width; ++i) acc[i] += t * float(aj[i]);
      }
      add_to_bf16_row(hp + m * width, acc.data(), width);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_rows", &lowrank_rows);
  m.def("lowrank_embed", &lowrank_embed);
}
