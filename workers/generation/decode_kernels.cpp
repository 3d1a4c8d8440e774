// The CPU decode step's own kernels (workers/generation/decode_kernel.py builds this file, once per machine).
//
// int8_mm: y = (x W^T) for int8 weights W (N x K in -127..127, one scale per output row) much as llama.cpp's
// Q8_0 multiplies: the activations x (M x K, bfloat16) are quantised to int8 per block of 16 columns (Q8_0: 32;
// 16 measured better: held-out perplexity 1.0057x float32 against 1.0075x, at the same speed)
// (x ~ d_b q, d_b = max|x_b| / 127, q rounded to nearest), and each block's integer dot product
// sum_k q_k W_nk (AVX-512 VNNI, 64 products an instruction) is scaled by d_b and summed in float32:
//     y_mn = s_n sum_b d_mb sum_{k in b} q_mk W_nk,   rounded once to bfloat16.
// VNNI multiplies unsigned by signed bytes, so it takes |q| and W with q's sign (hence W != -128). Every
// output element is computed the same way whichever rows share the call, so a row's result does not depend on its batch.
// Weights are read once per 8 activation rows, with a software prefetch a few pages ahead (measured on the
// 2-core AMD EPYC: 29 GB/s without it, 46 GB/s with it, over a 135M model's matrices in turn).
//
// int4_mm: y = x W^T for 4-bit weights in groups of 32 inputs, w = s_g (q - 8) + z_g (q in 0..15; torch's
// int4 layout, the same weights as GGUF's Q4_1 with minimum m_g = z_g - 8 s_g), with x quantised as above:
//     y_mn = sum_g (s_ng sum_{b in g} d_mb sum_{k in b} q_nk q'_mk + m_ng sum_{k in g} x_mk),
// the minimums' sums of x unquantised (float32).
// VNNI takes the codes as the unsigned side, so no sign trick. The weights are packed by int4_pack: per
// row, each 128 inputs are 64 bytes whose low nibbles are inputs 0..63 and high nibbles 64..127 (a last 64
// are 32 bytes: low 0..31, high 32..63), so two masks and a shift give 128 codes in input order. Scales
// and zeros are bfloat16, (2, N, K / 32). K must be a multiple of 64.
//
// Stack: a model's decoder layers for one call, the same torch operations in the same order as
// CompactLlama._block (workers/generation/compact.py) for rows without variant deltas, so the two give
// identical numbers: one Python call per step instead of some 20 per layer.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "bf16.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kVnni = true;

constexpr int64_t kPrefetch = 8192;  // bytes ahead of each weight row read (measured: see above)

// The activations of one call in the kernel's terms: q, or |q| and q's sign as one 64-bit mask per 64
// columns (M x Kp bytes, Kp = K rounded up to 64, zero padded), and d_b for each 64 columns as 16 lanes
// (4 lanes per block of 16: the lanes of a VNNI product of 64 bytes that sum that block).
struct QuantisedRows {
  std::vector<int8_t> values;  // q itself, for products whose other side is unsigned (int4 codes); or
  std::vector<uint8_t> magnitude;  // |q| and its sign, for products whose other side is signed (int8)
  std::vector<uint64_t> sign;
  std::vector<float> scale;
  int64_t chunks;
};

inline __m512 bf16x16(const uint16_t* p, __mmask16 keep) {
  const __m256i v = _mm256_maskz_loadu_epi16(keep, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// signed_values: q itself (for int4_mm), else |q| and q's signs (for int8_mm)
QuantisedRows quantise_rows(const uint16_t* x, int64_t M, int64_t K, bool signed_values) {
  QuantisedRows r;
  r.chunks = (K + 63) / 64;
  if (signed_values) {
    r.values.resize(M * r.chunks * 64);
  } else {
    r.magnitude.resize(M * r.chunks * 64);
    r.sign.resize(M * r.chunks);
  }
  r.scale.resize(M * r.chunks * 16);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < r.chunks; ++c) {
      __m512 v[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t col = c * 64 + j * 16, left = std::clamp<int64_t>(K - col, 0, 16);
        v[j] = bf16x16(x + m * K + std::min(col, K), (__mmask16)((1u << left) - 1u));
      }
      float d[4];
      __m128i b[4];
      for (int j = 0; j < 4; ++j) {  // round to nearest (even), saturating to int8 (|q| <= 127 by the scale)
        d[j] = _mm512_reduce_max_ps(_mm512_abs_ps(v[j])) / 127.f;
        const __m512 inverse = _mm512_set1_ps(d[j] > 0.f ? 1.f / d[j] : 0.f);
        b[j] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v[j], inverse)));
      }
      const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(b[0]), b[1], 1);
      const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(b[2]), b[3], 1);
      const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      if (signed_values) {
        _mm512_storeu_si512(r.values.data() + (m * r.chunks + c) * 64, q);
      } else {
        r.sign[m * r.chunks + c] = _mm512_movepi8_mask(q);
        _mm512_storeu_si512(r.magnitude.data() + (m * r.chunks + c) * 64, _mm512_abs_epi8(q));
      }
      _mm512_storeu_ps(r.scale.data() + (m * r.chunks + c) * 16,  // lanes 4j..4j+3 sum block j
                       _mm512_set_ps(d[3], d[3], d[3], d[3], d[2], d[2], d[2], d[2], d[1], d[1], d[1], d[1], d[0],
                                     d[0], d[0], d[0]));
    }
  }
  return r;
}

// Rows m0..m0+R-1 of y against output rows [n0, n1) of W (R <= 8 accumulators per output row).
template <int R>
void int8_rows(const QuantisedRows& xq, int64_t m0, const int8_t* w, const uint16_t* s, int64_t K, int64_t N,
               int64_t n0, int64_t n1, uint16_t* y) {
  const int64_t C = xq.chunks;
  const __m512i zero = _mm512_setzero_si512();
  const __mmask64 tail = (K % 64) ? ((__mmask64)1 << (K % 64)) - 1 : ~(__mmask64)0;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(c + 1 < C ? ~(__mmask64)0 : tail, row + c * 64);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * C + c;
        const __m512i signed_w = _mm512_mask_sub_epi8(wv, (__mmask64)xq.sign[at], zero, wv);
        const __m512i dot = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(xq.magnitude.data() + at * 64), signed_w);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(xq.scale.data() + at * 16), acc[r]);
      }
    }
    const float scale = bf16_to_float(s[n]);
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = float_to_bf16(_mm512_reduce_add_ps(acc[r]) * scale);
  }
}

// x's sums per group of 32 (float32, M x G): the minimums' term.
std::vector<float> group_sums(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t G = K / 32;
  std::vector<float> sums(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* p = x + m * K + g * 32;
      sums[m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(bf16x16(p, 0xFFFF), bf16x16(p + 16, 0xFFFF)));
    }
  return sums;
}

inline __m512 bf16x4_lanes(const uint16_t* p) {  // 4 bfloat16 values to floats in lanes 0..3
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm512_castps128_ps512(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(v), 16)));
}

template <int R>
void int4_rows(const QuantisedRows& xq, const std::vector<float>& sums, int64_t m0, const uint8_t* w,
               const uint16_t* scales, const uint16_t* zeros, int64_t K, int64_t N, int64_t n0, int64_t n1,
               uint16_t* y) {
  const int64_t C = xq.chunks, G = K / 32, pairs = K / 128, row_bytes = K / 2;
  const __m512i zero = _mm512_setzero_si512(), low = _mm512_set1_epi8(0x0F);
  const __m512i first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const uint16_t* s = scales + n * G;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {  // 128 inputs: chunks 2p and 2p + 1
      _mm_prefetch(reinterpret_cast<const char*>(row + p * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i packed = _mm512_loadu_si512(row + p * 64);
      const __m512i lo = _mm512_and_si512(packed, low), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      const __m512 sv = bf16x4_lanes(s + p * 4);
      const __m512 s01 = _mm512_permutexvar_ps(first, sv), s23 = _mm512_permutexvar_ps(second, sv);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * C + 2 * p;
        const __m512i d0 = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xq.values.data() + at * 64));
        const __m512i d1 = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(xq.values.data() + (at + 1) * 64));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(s01, _mm512_loadu_ps(xq.scale.data() + at * 16)), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(s23, _mm512_loadu_ps(xq.scale.data() + (at + 1) * 16)), acc[r]);
      }
    }
    if (K % 128) {  // a last 64 inputs: 32 bytes, low nibbles 0..31, high 32..63
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + pairs * 64));
      const __m256i lo = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(0x0F));
      const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      const __m512 s01 = _mm512_permutexvar_ps(first, bf16x4_lanes(s + pairs * 4));  // lanes 0, 1 used
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * C + 2 * pairs;
        const __m512i d = _mm512_dpbusd_epi32(zero, codes, _mm512_loadu_si512(xq.values.data() + at * 64));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s01, _mm512_loadu_ps(xq.scale.data() + at * 16)), acc[r]);
      }
    }
    const uint16_t* z = zeros + n * G;
    for (int r = 0; r < R; ++r) {
      float total = _mm512_reduce_add_ps(acc[r]);
      const float* xs = sums.data() + (m0 + r) * G;
      for (int64_t g = 0; g < G; ++g) total += (bf16_to_float(z[g]) - 8.f * bf16_to_float(s[g])) * xs[g];
      y[(m0 + r) * N + n] = float_to_bf16(total);
    }
  }
}

// Calls rows(R, m) for activation rows m..m+R-1 in groups of 8, then 4, 2 and 1 (R a compile-time size, so
// each group's accumulators stay in registers).
template <typename Rows>
void in_row_groups(int64_t M, Rows&& rows) {
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    if (left >= 8) { rows(std::integral_constant<int, 8>{}, m); m += 8; }
    else if (left >= 4) { rows(std::integral_constant<int, 4>{}, m); m += 4; }
    else if (left >= 2) { rows(std::integral_constant<int, 2>{}, m); m += 2; }
    else { rows(std::integral_constant<int, 1>{}, m); m += 1; }
  }
}

#else
constexpr bool kVnni = false;
#endif

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  TORCH_CHECK(kVnni, "this build has no AVX-512 VNNI int8 kernel");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && s.dim() == 1, "x (M, K), w (N, K), s (N)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && s.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar,
              "x and s bfloat16, w int8");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous(), "contiguous weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && s.size(0) == N, "sizes do not match");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const at::Tensor xc = x.contiguous();
  const QuantisedRows xq = quantise_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, false);
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));  // at least ~16 KB of weights
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    in_row_groups(M, [&](auto R, int64_t m) { int8_rows<decltype(R)::value>(xq, m, wp, sp, K, N, n0, n1, yp); });
  });
#endif
  return y;
}

// Packs int4 codes (N x K, uint8 in 0..15) into int4_mm's layout (N x K / 2 bytes).
at::Tensor int4_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.device().is_cpu(),
              "codes (N, K) uint8 on the CPU");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K % 64 == 0, "int4_mm needs input sizes divisible by 64");
  at::Tensor packed = at::empty({N, K / 2}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t start = 0; start < K; start += 128) {
      const int64_t half = std::min<int64_t>(64, (K - start) / 2);  // 64, or 32 for a last 64 inputs
      for (int64_t j = 0; j < half; ++j) {
        const uint8_t a = c[n * K + start + j], b = c[n * K + start + half + j];
        TORCH_CHECK(a < 16 && b < 16, "int4 codes lie in 0..15");
        out[n * (K / 2) + start / 2 + j] = uint8_t(a | (b << 4));
      }
    }
  return packed;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& params) {
  TORCH_CHECK(kVnni, "this build has no AVX-512 VNNI kernel");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && params.dim() == 3, "x (M, K), w (N, K / 2), params (2, N, K / 32)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && params.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kByte,
              "x and params bfloat16, w uint8");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && params.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(w.is_contiguous() && params.is_contiguous(), "contiguous weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 64 == 0 && w.size(1) * 2 == K, "sizes do not match (K a multiple of 64)");
  TORCH_CHECK(params.size(0) == 2 && params.size(1) == N && params.size(2) * 32 == K, "params (2, N, K / 32)");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const QuantisedRows xq = quantise_rows(xp, M, K, true);
  const std::vector<float> sums = group_sums(xp, M, K);
  // a last 64 inputs' scales are read 4 at a time, 2 past the row's end: the next row's, or the zeros'
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(params.data_ptr());
  const uint16_t* zeros = scales + N * (K / 32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    in_row_groups(M, [&](auto R, int64_t m) {
      int4_rows<decltype(R)::value>(xq, sums, m, wp, scales, zeros, K, N, n0, n1, yp);
    });
  });
#endif
  return y;
}

enum Kind : int64_t { kFloat = 0, kInt8 = 1, kInt8Torch = 2, kInt4Torch = 3, kInt4 = 4 };

struct Linear {
  int64_t kind = kFloat, out = 0;
  at::Tensor weight, scale, bias;  // scale: int8 scales, or int4 scales and zeros; bias: empty when none

  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == kFloat) return at::linear(x, weight, bias.numel() ? std::optional<at::Tensor>(bias) : std::nullopt);
    std::vector<int64_t> sizes = x.sizes().vec();
    const at::Tensor flat = x.reshape({-1, sizes.back()});
    at::Tensor y = kind == kInt8        ? int8_mm(flat, weight, scale)
                   : kind == kInt8Torch ? at::_weight_int8pack_mm(flat, weight, scale)
                   : kind == kInt4      ? int4_mm(flat, weight, scale)
                                        : at::_weight_int4pack_mm_for_cpu(flat, weight, 32, scale);
    sizes.back() = out;
    y = y.view(sizes);
    return bias.numel() ? y + bias : y;
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

class Stack {
 public:
  Stack(std::vector<at::Tensor> norms, std::vector<at::Tensor> tensors, std::vector<int64_t> kinds,
        std::vector<bool> sliding, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale,
        at::ScalarType dtype, at::ScalarType kv_dtype)
      : sliding_(std::move(sliding)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps),
        scale_(scale), dtype_(dtype), kv_dtype_(kv_dtype) {
    const size_t count = sliding_.size();
    TORCH_CHECK(norms.size() == 2 * count && tensors.size() == 12 * count && kinds.size() == 8 * count,
                "two norms, four linears (weight, scale, bias; kind, out) per layer");
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "head sizes");
    for (size_t i = 0; i < count; ++i) {
      Layer layer{norms[2 * i], norms[2 * i + 1], {}, {}, {}, {}};
      Linear* linears[4] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
      for (size_t j = 0; j < 4; ++j) {
        const int64_t kind = kinds[8 * i + 2 * j];
        TORCH_CHECK(kind >= kFloat && kind <= kInt4, "linear kind");
        *linears[j] = Linear{kind, kinds[8 * i + 2 * j + 1], tensors[12 * i + 3 * j], tensors[12 * i + 3 * j + 1],
                             tensors[12 * i + 3 * j + 2]};
      }
      layers_.push_back(std::move(layer));
    }
  }

  // Hidden states after layers start+1..stop of hidden (B, q, H), as CompactLlama.run_layers computes them.
  at::Tensor run(at::Tensor hidden, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys_all,
                 const at::Tensor& values_all, int64_t start, int64_t stop, int64_t column,
                 const std::optional<at::Tensor>& full_mask, const std::optional<at::Tensor>& sliding_mask,
                 bool causal) const {
    TORCH_CHECK(hidden.dim() == 3 && 0 <= start && start <= stop && stop <= (int64_t)layers_.size(), "layers");
    TORCH_CHECK(keys_all.dim() == 5 && stop <= keys_all.size(0) && values_all.sizes() == keys_all.sizes(), "cache");
    const int64_t rows = hidden.size(0), q = hidden.size(1), width = hidden.size(2), total = column + q;
    TORCH_CHECK(rows <= keys_all.size(1) && column >= 0 && total <= keys_all.size(3), "the cache is too small");
    const int64_t nh = heads_, kvh = kv_heads_, hd = head_dim_;
    for (int64_t i = start; i < stop; ++i) {
      const Layer& layer = layers_[i];
      const at::Tensor keys = keys_all[i].narrow(0, 0, rows), values = values_all[i].narrow(0, 0, rows);
      const at::Tensor normed = at::rms_norm(hidden, {width}, layer.input_norm, eps_);
      const at::Tensor qkv = layer.qkv(normed).view({rows, q, nh + 2 * kvh, hd});
      at::Tensor qk = qkv.narrow(2, 0, nh + kvh);
      qk = qk * cos + qk.roll({hd / 2}, {-1}) * sin;
      keys.narrow(2, column, q).copy_(qk.narrow(2, nh, kvh).transpose(1, 2).to(kv_dtype_));
      values.narrow(2, column, q).copy_(qkv.narrow(2, nh + kvh, kvh).transpose(1, 2).to(kv_dtype_));
      const std::optional<at::Tensor>& mask = sliding_[i] ? sliding_mask : full_mask;
      at::Tensor attn = at::scaled_dot_product_attention(
          qk.narrow(2, 0, nh).transpose(1, 2).to(kv_dtype_), keys.narrow(2, 0, total), values.narrow(2, 0, total),
          mask, 0.0, causal, scale_, kvh != nh);
      attn = attn.transpose(1, 2).reshape({rows, q, nh * hd}).to(dtype_);
      hidden = hidden + layer.o(attn);
      const at::Tensor mlp_in = at::rms_norm(hidden, {width}, layer.post_norm, eps_);
      const std::vector<at::Tensor> gate_up = layer.gate_up(mlp_in).chunk(2, -1);
      hidden = hidden + layer.down(at::silu(gate_up[0]) * gate_up[1]);
    }
    return hidden;
  }

 private:
  std::vector<Layer> layers_;
  std::vector<bool> sliding_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  at::ScalarType dtype_, kv_dtype_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("has_vnni") = kVnni;
  // the GIL is released while they run (as torch's own operations do): a long prefill must not stop the
  // worker's other threads, its heartbeat among them
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("int8_mm", &int8_mm, release(), "y = x W^T with x quantised to int8 per block of 16 (the file's head)");
  m.def("int4_mm", &int4_mm, release(), "y = x W^T for int4_pack's weights, x quantised as int8_mm's");
  m.def("int4_pack", &int4_pack, release(), "int4 codes (N, K) uint8 in int4_mm's layout (N, K / 2)");
  py::class_<Stack>(m, "Stack")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<bool>,
                    int64_t, int64_t, int64_t, double, double, at::ScalarType, at::ScalarType>())
      .def("run", &Stack::run, release());
}
