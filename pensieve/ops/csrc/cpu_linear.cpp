// A linear layer for decode-sized batches on CPU: out [M, N] = x [M, K] @ weight [N, K]^T (+ bias).
//
//   pensieve_cpu::linear(x, weight, bias) -> out   (fake impl in pensieve/ops/cpu_kernel.py)
//
// A decode step's linears should be bound by reading the weights: M (the batch) is small. BLAS sgemm
// for small M reads them well below the memory bandwidth on this machine kind (measured: SmolLM2's 211 linears at
// M = 16 take 55-80 ms with MKL, where streaming their 425 MB takes ~17 ms). This kernel streams each weight row
// once and applies it to every row of x while it is in L1: tiles of TN weight rows x TM x rows, 16 accumulators
// (one per output), reduced together at the end (`reduce_lanes`). bf16 uses AVX-512 BF16 dot products
// (vdpbf16ps) where the CPU has them. Threads split N. For larger M it calls at::linear (BLAS/oneDNN), which
// is compute-efficient there (see max_rows). Measured since (docs/performance.md): this kernel streams at ~11-17 GB/s,
// below the machine's bandwidth, and at M = 8 in bf16 it is compute-bound (~50 GFLOPS): AMX is the next step.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "reduce_lanes.h"

namespace pensieve_cpu {
namespace {

using at::vec::Vectorized;

// Larger batches go to at::linear (measured crossovers on SmolLM2's linears, 2 threads: fp32 ~24 rows; bf16 ~10,
// past which oneDNN's AMX kernels win).
inline int64_t max_rows(at::ScalarType type) { return type == at::kBFloat16 ? 10 : 24; }
constexpr int64_t kAcc = 16;  // accumulators per tile: TM x rows x TN weight rows, TM * TN = 16

// acc[i * TN + j] += x[i] . w[j] over one step of K starting at k; `n` valid elements (tail: masked loads).
template <typename scalar_t>
struct Dot {  // float, double
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t kStep = Vec::size();
  template <int TM, int TN>
  static inline void step(const scalar_t* const* x, const scalar_t* const* w, int64_t k, int64_t n, Vec* acc) {
    Vec wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = n == kStep ? Vec::loadu(w[j] + k) : Vec::loadu(w[j] + k, n);
    for (int i = 0; i < TM; ++i) {
      const Vec xv = n == kStep ? Vec::loadu(x[i] + k) : Vec::loadu(x[i] + k, n);
      for (int j = 0; j < TN; ++j) acc[i * TN + j] = at::vec::fmadd(xv, wv[j], acc[i * TN + j]);
    }
  }
};

template <>
struct Dot<c10::BFloat16> {
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  // vdpbf16ps: each fp32 lane accumulates the products of one pair of bf16 elements (exact in fp32)
  static constexpr int64_t kStep = 2 * Vec::size();
  using Raw = __m512bh;
  static inline Raw load(const c10::BFloat16* p, int64_t n) {
    return (__m512bh)(n == kStep ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p));
  }
  static inline Vec madd(const Raw& x, const Raw& w, const Vec& acc) { return Vec(_mm512_dpbf16_ps(acc, x, w)); }
#else
  static constexpr int64_t kStep = Vec::size();
  using Raw = Vec;
  static inline Raw load(const c10::BFloat16* p, int64_t n) {
    if (n == kStep) {
      Vec out;
      at::vec::load_to_float<c10::BFloat16>(p, out);
      return out;
    }
    alignas(64) float tmp[Vec::size()] = {0};
    for (int64_t e = 0; e < n; ++e) tmp[e] = static_cast<float>(p[e]);
    return Vec::loadu(tmp);
  }
  static inline Vec madd(const Raw& x, const Raw& w, const Vec& acc) { return at::vec::fmadd(x, w, acc); }
#endif
  template <int TM, int TN>
  static inline void step(const c10::BFloat16* const* x, const c10::BFloat16* const* w, int64_t k, int64_t n,
                          Vec* acc) {
    Raw wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = load(w[j] + k, n);
    for (int i = 0; i < TM; ++i) {
      const Raw xv = load(x[i] + k, n);
      for (int j = 0; j < TN; ++j) acc[i * TN + j] = madd(xv, wv[j], acc[i * TN + j]);
    }
  }
};

// Each thread takes a range of TN-row weight tiles. For one tile, every TM-row tile of x is applied while the weight
// rows are in L1; K is walked in chunks of ~512 bytes per row so that the x chunk (M rows) and the weight chunk stay
// in L1 together (the accumulators of all x tiles wait in a small buffer between chunks). TM = 1 for M = 1 (no
// padded rows), 2 for M = 2, else 4.
template <typename scalar_t, int TM>
void linear_small(const scalar_t* x, int64_t x_stride, const scalar_t* w, const scalar_t* bias, scalar_t* out,
                  int64_t M, int64_t N, int64_t K) {
  constexpr int TN = kAcc / TM;
  using D = Dot<scalar_t>;
  using Vec = typename D::Vec;
  using acc_t = typename Vec::value_type;
  static_assert(kAcc % Vec::size() == 0, "the accumulators reduce in whole vectors");
  const int64_t num_m_tiles = (M + TM - 1) / TM;
  const int64_t chunk =
      num_m_tiles == 1 ? K : std::max<int64_t>(D::kStep, 512 / sizeof(scalar_t) / D::kStep * D::kStep);
  const int64_t num_tiles = (N + TN - 1) / TN;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> saved(num_m_tiles * kAcc);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * TN;
      const scalar_t* wr[TN];
      for (int j = 0; j < TN; ++j) wr[j] = w + std::min(n0 + j, N - 1) * K;  // past N: a repeated row
      std::fill(saved.begin(), saved.end(), Vec(0));
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t k1 = std::min(K, k0 + chunk);
        for (int64_t mt = 0; mt < num_m_tiles; ++mt) {
          const scalar_t* xr[TM];
          for (int i = 0; i < TM; ++i) xr[i] = x + std::min(mt * TM + i, M - 1) * x_stride;  // past M: repeated
          Vec acc[kAcc];
          for (int a = 0; a < kAcc; ++a) acc[a] = saved[mt * kAcc + a];
          for (int64_t k = k0; k < k1; k += D::kStep) D::template step<TM, TN>(xr, wr, k, std::min(D::kStep, k1 - k), acc);
          for (int a = 0; a < kAcc; ++a) saved[mt * kAcc + a] = acc[a];
        }
      }
      for (int64_t mt = 0; mt < num_m_tiles; ++mt) {
        alignas(64) acc_t sums[kAcc];
        for (int g = 0; g < kAcc; g += Vec::size()) reduce_lanes<acc_t>(&saved[mt * kAcc + g]).store(sums + g);
        for (int i = 0; i < TM && mt * TM + i < M; ++i) {
          for (int j = 0; j < TN && n0 + j < N; ++j) {
            acc_t v = sums[i * TN + j];
            if (bias != nullptr) v += static_cast<acc_t>(bias[n0 + j]);
            out[(mt * TM + i) * N + n0 + j] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be [N, K], got rank ", weight.dim());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dim ", x.size(-1), " != K = ",
                    weight.size(1));
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type(), "x dtype ", x.scalar_type(), " != weight dtype ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                              bias->scalar_type() == weight.scalar_type()),
                    "bias must be [N] in the weight's dtype");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()),
                    "pensieve_cpu::linear takes CPU tensors");
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K > 0 ? x.numel() / K : 0;
  const auto type = x.scalar_type();
  const bool supported = type == at::kFloat || type == at::kDouble || type == at::kBFloat16;
  if (!supported || M > max_rows(type) || M == 0 || K == 0) return at::linear(x, weight, bias);
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const at::Tensor wc = weight.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, type, "pensieve_linear", [&] {
    auto run = M == 1 ? linear_small<scalar_t, 1> : M == 2 ? linear_small<scalar_t, 2> : linear_small<scalar_t, 4>;
    run(xc.data_ptr<scalar_t>(), xc.stride(0), wc.data_ptr<scalar_t>(), bc ? bc->data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), M, N, K);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pensieve_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pensieve_cpu, CPU, m) {
  m.impl("linear", &linear);
}

}  // namespace pensieve_cpu
