// A linear layer for decode-sized batches on CPU: out [M, N] = x [M, K] @ weight [N, K]^T (+ bias).
//
//   pensieve_cpu::linear(x, weight, bias, packed) -> out   (fake impl in pensieve/ops/cpu_kernel.py)
//
// A decode step's linears should be bound by reading the weights: M (the batch) is small. BLAS sgemm
// for small M reads them well below the memory bandwidth on this machine kind (measured: SmolLM2's 211 linears at
// M = 16 take 55-80 ms with MKL, where streaming their 425 MB takes ~17 ms). This kernel streams each weight row
// once and applies it to every row of x while it is in L1: tiles of TN weight rows x TM x rows, 16 accumulators
// (one per output), reduced together at the end (`reduce_lanes`). bf16 uses AVX-512 BF16 dot products
// (vdpbf16ps) where the CPU has them. Threads split N. For larger M it calls at::linear (BLAS/oneDNN), which
// is compute-efficient there (see max_rows). Measured since with every layer's weights from memory
// (benchmarks/linear.py, docs/performance.md): one fp32 row streams at the memory's bandwidth (540 MB in ~21 ms), but
// more rows cost it 1.2-2.2x that, and bf16 rows are slower than AMX's. Hence the packed path at the end of this
// file: weights packed once for oneDNN's brgemm (AMX for bf16), used for 1 (bf16) or 2 (fp32) to 256 rows when
// given; fp32 up to 16 rows reads them with its own FMA loop, bf16 up to 32 rows with its own AMX tiles. Where the CPU
// has no bf16 dot products (AVX2), bf16 is widened to fp32 on the way in: packed blocks one at a time
// (linear_packed_impl<float, bf16>), prefill rows by panels of the weight (linear_bf16_widened).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx.h"
#include "bf16_dot.h"
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include "reduce_lanes.h"

namespace pensieve_cpu {
namespace {

using at::vec::Vectorized;

// Larger batches go to at::linear (measured crossovers on SmolLM2's linears, 2 threads: fp32 ~24 rows; bf16 ~10,
// past which oneDNN's AMX kernels win).
inline int64_t max_rows(at::ScalarType type) { return type == at::kBFloat16 ? 10 : 24; }
// Accumulators per tile: TM x rows x TN weight rows, TM * TN = kAcc. 16 with AVX-512's 32 registers; 8 where
// vectors are 256-bit (AVX2 has 16 registers: 16 accumulators and their operands spilled, and bf16 rows streamed at
// half the memory's bandwidth on an AVX2 host).
constexpr int64_t kAcc = Vectorized<float>::size() >= 16 ? 16 : 8;

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

// bf16 weights widened to fp32 per load, x already in fp32 (converted once per call, not once per weight tile: see
// `linear`): where the CPU has no bf16 dot products, or PENSIEVE_CPU_BF16_DOT=0.
template <>
struct Dot<c10::BFloat16> {
  using Vec = Vectorized<float>;
  static constexpr int64_t kStep = Vec::size();
  static inline Vec load(const c10::BFloat16* p, int64_t n) {
    if (n == kStep) {
      Vec out;
      at::vec::load_to_float<c10::BFloat16>(p, out);
      return out;
    }
    alignas(64) float tmp[Vec::size()] = {0};
    for (int64_t e = 0; e < n; ++e) tmp[e] = static_cast<float>(p[e]);
    return Vec::loadu(tmp);
  }
  template <int TM, int TN>
  static inline void step(const float* const* x, const c10::BFloat16* const* w, int64_t k, int64_t n, Vec* acc) {
    Vec wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = load(w[j] + k, n);
    for (int i = 0; i < TM; ++i) {
      const Vec xv = n == kStep ? Vec::loadu(x[i] + k) : Vec::loadu(x[i] + k, n);
      for (int j = 0; j < TN; ++j) acc[i * TN + j] = at::vec::fmadd(xv, wv[j], acc[i * TN + j]);
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// vdpbf16ps: each fp32 lane accumulates the products of one pair of bf16 elements (exact in fp32). Compiled where
// the build's flags have AVX-512 BF16 (cpu_kernel.py adds it where the CPU reports it), run where bf16_dot_ready().
struct DotBf16Native {
  using Vec = Vectorized<float>;
  static constexpr int64_t kStep = 2 * Vec::size();
  using Raw = __m512bh;
  static inline Raw load(const c10::BFloat16* p, int64_t n) {
    return (__m512bh)(n == kStep ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p));
  }
  template <int TM, int TN>
  static inline void step(const c10::BFloat16* const* x, const c10::BFloat16* const* w, int64_t k, int64_t n,
                          Vec* acc) {
    Raw wv[TN];
    for (int j = 0; j < TN; ++j) wv[j] = load(w[j] + k, n);
    for (int i = 0; i < TM; ++i) {
      const Raw xv = load(x[i] + k, n);
      for (int j = 0; j < TN; ++j) acc[i * TN + j] = Vec(_mm512_dpbf16_ps(acc[i * TN + j], xv, wv[j]));
    }
  }
};
#define PENSIEVE_STREAMING_BF16_DOT 1
#endif

// Each thread takes a range of TN-row weight tiles. For one tile, every TM-row tile of x is applied while the weight
// rows are in L1; K is walked in chunks of ~512 bytes per row so that the x chunk (M rows) and the weight chunk stay
// in L1 together (the accumulators of all x tiles wait in a small buffer between chunks). TM = 1 for M = 1 (no
// padded rows), 2 for M = 2, else 4.
template <typename scalar_t, int TM, typename x_t = scalar_t, typename D = Dot<scalar_t>>
void linear_small(const x_t* x, int64_t x_stride, const scalar_t* w, const scalar_t* bias, scalar_t* out,
                  int64_t M, int64_t N, int64_t K) {
  constexpr int TN = kAcc / TM;
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
          const x_t* xr[TM];
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


// ---- Packed weights: oneDNN's brgemm micro-kernel (AMX tiles for bf16, AVX-512/AVX2 FMAs for fp32) ----
//
//   pensieve_cpu::pack_weight(weight [N, K]) -> packed [ceil(N / 32), K * 32]
//   pensieve_cpu::linear(x, weight, bias, packed) -> 2..256 rows (bf16: 1..256) through the packed weight
//   pensieve_cpu::can_pack(dtype) -> bool   (whether brgemm runs here for fp32 / bf16)
//   pensieve_cpu::packs_bf16_vnni() -> bool (bf16 packs in the VNNI layout for brgemm's bf16 kernel; else plain blocks)
//   pensieve_cpu::uses_amx() -> bool        (whether pensieve's own AMX kernels run: linear_amx, bf16 attention scores)
//
// brgemm reads B as [K, BN] blocks; bf16 B must be in the VNNI layout AMX reads (pairs of K interleaved,
// [K/2, BN, 2], made by cpublas::pack). The weight is packed once, when the model is handed to pensieve, into
// blocks of kPackN output columns (the last block padded with zero columns), so a step reads each block as one
// contiguous stream. Measured on SmolLM2-135M's linears from memory (2 threads, docs/performance.md): bf16 M = 8 at
// 2.3x the streaming kernel above, fp32 M = 16 at 1.6x (through the FMA loop below). Threads split the N blocks;
// x rows go in tiles of kPackM.
constexpr int64_t kPackN = 32;
constexpr int64_t kPackM = 32;
// One fp32 row: the streaming kernel above is as fast (its vdpbf16ps bf16 row is not: 15.1 vs 13.3 ms for SmolLM2's
// linears from memory). Past 256 rows (prefill): at::linear was as fast or faster.
inline int64_t min_packed_rows(at::ScalarType type) { return type == at::kBFloat16 ? 1 : 2; }
constexpr int64_t kMaxPackedRows = 256;

template <typename scalar_t>
constexpr bool is_vnni() { return std::is_same_v<scalar_t, c10::BFloat16>; }

// bf16 -> fp32 (exact: the bf16 bits are fp32's upper half). 2.5x at::vec::convert on the AVX2 host (L2-resident).
inline void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; i + 8 <= n; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One packed VNNI block [K/2, kPackN, 2] of bf16 -> plain fp32 [K, kPackN] (exact): the even k of a pair is the low
// half of each 32-bit lane, the odd k the high half. For brgemm's fp32 kernel where the bf16 kernels lose to it.
#ifdef PENSIEVE_BF16_DOT
PENSIEVE_BF16_DOT_TARGET void widen_vnni_block(const c10::BFloat16* src, float* dst, int64_t K) {
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    for (int64_t v = 0; v < kPackN / 16; ++v) {  // 16 columns' pairs per vector
      const __m512i pairs = _mm512_loadu_si512(src + (kp * kPackN + v * 16) * 2);
      _mm512_storeu_si512(dst + 2 * kp * kPackN + v * 16, _mm512_slli_epi32(pairs, 16));
      _mm512_storeu_si512(dst + (2 * kp + 1) * kPackN + v * 16, _mm512_and_si512(pairs, high));
    }
  }
}
#endif

// Whether brgemm takes bf16 here (AVX-512 BF16 / AMX): then bf16 weights pack in the VNNI layout. Elsewhere (AVX2)
// they pack in fp32's plain blocks, still bf16, and each block is widened to fp32 when a step uses it
// (linear_packed_impl<float, bf16>).
inline bool bf16_vnni() {
  static const bool vnni = at::native::cpublas::could_pack(at::kBFloat16);
  return vnni;
}

// How bf16 runs through packed weights here (the first that applies): pensieve's AMX tiles (1..32 rows), oneDNN's
// brgemm bf16 kernel, pensieve's vdpbf16ps loop (linear_dot), or plain blocks widened to fp32 for brgemm's fp32
// kernel. All but the last read the VNNI layout: [K/2, kPackN, 2] per block, pairs of K interleaved.
inline bool packs_vnni() { return bf16_vnni() || bf16_dot_ready(); }
// Whether pensieve's dot loop is the only reader of the VNNI blocks (no bf16 brgemm: AMD Zen 4/5).
inline bool bf16_dot_only() { return !bf16_vnni() && bf16_dot_ready(); }
// Past this many rows the dot loop is compute-bound and brgemm's fp32 kernel over widened blocks is faster
// (SmolLM2's linears, Sapphire Rapids with AMX off, 2 threads: 24 rows 27.1 vs 30.4 ms, 32 rows 35.3 vs 35.0, 48 rows
// 49.7 vs 43.8, 256 rows 248 vs 177).
constexpr int64_t kMaxDotRows = 32;

// Rows that take the packed weight, at most. bf16 where only pensieve's dot loop reads VNNI blocks (no bf16 brgemm):
// every row count, since oneDNN's bf16 GEMM behind at::linear (AVX-512 BF16) lost to the widened blocks at every size
// measured (257 rows 280 vs 196 ms, 512 547 vs 384, 1024 1051 vs 755; MKL's fp32 sgemm: 512 rows 337).
inline int64_t max_packed_rows(at::ScalarType type) {
  return type == at::kBFloat16 && bf16_dot_only() ? std::numeric_limits<int64_t>::max() : kMaxPackedRows;
}

at::Tensor pack_weight(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.device().is_cpu(), "pack_weight takes a CPU weight [N, K]");
  const auto type = weight.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kBFloat16, "pack_weight takes fp32 or bf16, got ", type);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(type != at::kBFloat16 || K % 2 == 0, "a bf16 weight packs in pairs of K: K = ", K, " is odd");
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  // [K, blocks * kPackN]: the weight transposed, zero columns past N
  at::Tensor wt = at::zeros({K, blocks * kPackN}, weight.options());
  wt.narrow(1, 0, N).copy_(weight.t());
  at::Tensor packed = at::empty({blocks, K * kPackN}, weight.options());
  if (type == at::kBFloat16 && bf16_vnni()) {
    const auto* src = wt.data_ptr<c10::BFloat16>();
    auto* dst = packed.data_ptr<c10::BFloat16>();
    for (int64_t b = 0; b < blocks; ++b)
      at::native::cpublas::pack(K, kPackN, blocks * kPackN, kPackN, type, type, src + b * kPackN, dst + b * K * kPackN);
    return packed;
  }
  if (type == at::kBFloat16 && packs_vnni()) {  // the same layout, without brgemm: dst[b][kp][c][e] = W[b * 32 + c][2kp + e]
    const int16_t* src = reinterpret_cast<const int16_t*>(wt.data_ptr<c10::BFloat16>());
    int16_t* dst = reinterpret_cast<int16_t*>(packed.data_ptr<c10::BFloat16>());
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t kp = 0; kp < K / 2; ++kp)
          for (int64_t c = 0; c < kPackN; ++c)
            for (int64_t e = 0; e < 2; ++e)
              dst[((b * K / 2 + kp) * kPackN + c) * 2 + e] = src[(2 * kp + e) * blocks * kPackN + b * kPackN + c];
    });
    return packed;
  }
  // Plain [K, kPackN] blocks: fp32, and bf16 where brgemm has no bf16 kernel (widened per block when used).
  const auto* src = static_cast<const char*>(wt.data_ptr());
  auto* dst = static_cast<char*>(packed.data_ptr());
  const int64_t item = weight.element_size();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(dst + (b * K + k) * kPackN * item, src + (k * blocks * kPackN + b * kPackN) * item, kPackN * item);
  });
  return packed;
}

// A packed block's results: out[i][j] = acc[i][j] (+ bias[j]) for `rows` rows of `cols` (<= kPackN) outputs, acc at
// kPackN floats a row, out at N elements a row (both already at the block's first row and column).
template <typename w_t>
inline void store_block(const float* acc, int64_t rows, int64_t cols, const w_t* bias, w_t* out, int64_t N) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = acc + i * kPackN;
    w_t* o = out + i * N;
    for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<w_t>(bias ? a[j] + static_cast<float>(bias[j]) : a[j]);
  }
}

// x_t: the rows as brgemm reads them; w_t: the packed blocks. bf16 blocks with fp32 rows (no bf16 brgemm here: x
// widened to fp32 once by the caller) are widened into a thread's fp32 buffer once per block (items run m fastest)
// for brgemm's fp32 kernel: products of bf16 values are exact in fp32 and summed in fp32, as with native bf16.
template <typename x_t, typename w_t = x_t>
void linear_packed_impl(const x_t* x, int64_t x_stride, const w_t* packed, const w_t* bias, w_t* out, int64_t M,
                        int64_t N, int64_t K, bool vnni = false) {
  constexpr bool widen = !std::is_same_v<x_t, w_t>;
  const int64_t n_blocks = (N + kPackN - 1) / kPackN, m_blocks = (M + kPackM - 1) / kPackM;
  // Work item = (n block, m block), m fastest: a thread keeps one weight block in cache across the x tiles.
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kPackM * kPackN];
    std::vector<x_t> block(widen ? K * kPackN : 0);
    int64_t widened = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = item / m_blocks, mb = item % m_blocks;
      const int64_t m0 = mb * kPackM, rows = std::min(kPackM, M - m0);
      const int64_t n0 = nb * kPackN, cols = std::min(kPackN, N - n0);
      const x_t* b;
      if constexpr (widen) {
        if (nb != widened) {
#ifdef PENSIEVE_BF16_DOT
          if (vnni) {
            widen_vnni_block(packed + nb * K * kPackN, block.data(), K);
          } else
#endif
            widen_bf16(packed + nb * K * kPackN, block.data(), K * kPackN);
        }
        widened = nb;
        b = block.data();
      } else {
        b = packed + nb * K * kPackN;
      }
      at::native::cpublas::brgemm(rows, kPackN, K, x_stride, kPackN, kPackN, false, x + m0 * x_stride, b, acc,
                                  is_vnni<x_t>());
      store_block(acc, rows, cols, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
    }
    at::native::cpublas::brgemm_release(is_vnni<x_t>());
  });
}

// fp32, 2..kMaxPackedFma rows (instantiated from 1): the packed blocks through a plain FMA loop instead of brgemm.
// For each k of a block, its kPackN weights of row k (contiguous) times x[m][k] broadcast, for all M rows at once
// (M * kPackN / W accumulators in registers). The stream of blocks is prefetched kFmaAhead bytes ahead, two lines per k, into L2.
// Measured against brgemm on SmolLM2's linears with every layer's weights from memory (benchmarks/linear.py,
// docs/performance.md): 1.1-1.25x faster at 2..16 rows; brgemm is faster past 16 (tiles of rows that reread a
// block from L2 lost to it), and the streaming kernel at 1 row.
constexpr int64_t kMaxPackedFma = 16;
constexpr int64_t kFmaAhead = 8192;

template <int M>
void linear_packed_fma(const float* x, int64_t x_stride, const float* packed, const float* bias, float* out,
                       int64_t N, int64_t K) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size(), NV = kPackN / Vec::size();
  static_assert(kPackN % Vec::size() == 0, "a block row is whole vectors");
  const int64_t n_blocks = (N + kPackN - 1) / kPackN;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {  // a thread's blocks are contiguous: one stream
      const float* w = packed + nb * K * kPackN;
      Vec acc[M][NV];
      for (int m = 0; m < M; ++m)
        for (int v = 0; v < NV; ++v) acc[m][v] = Vec(0);
      for (int64_t k = 0; k < K; ++k) {
        const float* row = w + k * kPackN;
        for (int64_t b = 0; b < kPackN * 4; b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(row) + kFmaAhead + b, 0, 2);
        Vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = Vec::loadu(row + v * W);
        for (int m = 0; m < M; ++m) {
          const Vec xb(x[m * x_stride + k]);
          for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(xb, wv[v], acc[m][v]);
        }
      }
      const int64_t n0 = nb * kPackN, cols = std::min(kPackN, N - n0);
      for (int v = 0; v < NV; ++v) {
        const int64_t c0 = v * W, c = std::min<int64_t>(W, cols - c0);
        if (c <= 0) break;
        const Vec b = bias ? Vec::loadu(bias + n0 + c0, c) : Vec(0);
        for (int m = 0; m < M; ++m) (acc[m][v] + b).store(out + m * N + n0 + c0, c);
      }
    }
  });
}

// bf16, 1..kMaxAmxRows rows (K a multiple of 32): the packed VNNI blocks straight through AMX tiles, no brgemm.
// Per 32 k of a block: one A tile (the x rows' 32 k), two B tiles (the block's 16 k-pairs x 16 columns, twice; a
// k-pair row of the block is 128 bytes, so each B tile is loaded at a 128-byte stride), two tdpbf16ps into C tiles
// that stay in the tile registers for the whole K; more than 16 rows use a second A tile and two more C tiles. The
// stream of blocks is prefetched kAmxAhead bytes ahead into L2 (a k step reads 2 KB). Same products, same order as
// brgemm's AMX kernel (the outputs are bit-identical), but no kernel lookup per 32-column block: SmolLM2's 210
// linears of 30 layers from memory, 1-16 rows, 8.2-9.0 ms against brgemm's 9.8-10.0 (25-26 GB/s, what a plain sum
// streams in the same minute); 32 rows 10.6 vs 12.3.
#ifdef PENSIEVE_AMX
constexpr int64_t kMaxAmxRows = 32;
constexpr int64_t kAmxAhead = 2048;

template <int MT>  // 16-row tiles of x: 1 (M <= 16) or 2 (M <= 32)
void linear_amx(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* packed, const c10::BFloat16* bias,
                c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const int64_t n_blocks = (N + kPackN - 1) / kPackN;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    // tiles 0, 1: C of rows 0..15 (columns 0..15, 16..31); 2, 3: C of rows 16..31; 4, 5: A of those rows; 6, 7: B
    TileConfig cfg;
    const int rows0 = MT == 1 ? static_cast<int>(M) : 16, rows1 = MT == 2 ? static_cast<int>(M) - 16 : 0;
    for (int t : {0, 1, 4}) cfg.set(t, rows0, 64);
    for (int t : {2, 3, 5}) cfg.set(t, rows1, 64);
    for (int t : {6, 7}) cfg.set(t, 16, 64);
    _tile_loadconfig(&cfg);
    alignas(64) float acc[kMaxAmxRows * kPackN];
    const int64_t x_bytes = x_stride * static_cast<int64_t>(sizeof(c10::BFloat16));
    for (int64_t nb = begin; nb < end; ++nb) {  // a thread's blocks are contiguous: one stream
      const c10::BFloat16* w = packed + nb * K * kPackN;
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (MT == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const char* ahead = reinterpret_cast<const char*>(w + k0 * kPackN) + kAmxAhead;
        for (int64_t b = 0; b < 32 * kPackN * 2; b += 64) __builtin_prefetch(ahead + b, 0, 2);
        _tile_loadd(4, x + k0, x_bytes);
        _tile_loadd(6, w + k0 * kPackN, 2 * kPackN * 2);
        _tile_loadd(7, w + k0 * kPackN + kPackN, 2 * kPackN * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (MT == 2) {
          _tile_loadd(5, x + 16 * x_stride + k0, x_bytes);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, acc, kPackN * 4);
      _tile_stored(1, acc + 16, kPackN * 4);
      if constexpr (MT == 2) {
        _tile_stored(2, acc + 16 * kPackN, kPackN * 4);
        _tile_stored(3, acc + 16 * kPackN + 16, kPackN * 4);
      }
      const int64_t n0 = nb * kPackN, cols = std::min(kPackN, N - n0);
      store_block(acc, M, cols, bias ? bias + n0 : nullptr, out + n0, N);
    }
    release_tiles();
  });
}

// Whether the AMX kernel above takes this problem.
inline bool use_amx(int64_t M, int64_t K) { return M <= kMaxAmxRows && K % 32 == 0 && amx_ready(); }
#endif

// bf16, 1..kMaxPackedRows rows where the CPU has AVX-512 BF16 but pensieve's AMX kernel does not run and oneDNN's
// brgemm has no bf16 kernel (AMD Zen 4/5; Sapphire Rapids with AMX switched off): the packed VNNI blocks through
// vdpbf16ps. A k-pair row of a block is kPackN column pairs (128 bytes, two vectors); per k pair, both vectors times
// the pair (x[m][k], x[m][k+1]) broadcast, into two accumulators per row (16 columns each). Rows go in tiles of at
// most kDotRows (2 x 12 accumulators, 2 weight vectors and a broadcast: 27 of AVX-512's 32 registers), balanced; a
// block is read from memory by the first tile (prefetched kDotAhead bytes ahead, its two lines per k pair) and from
// L1/L2 by the others. One or two rows keep two sets of accumulators over alternating k pairs (one dependency chain
// per accumulator would wait on vdpbf16ps's latency). Products of bf16 pairs are exact in fp32 and summed in fp32,
// as with AMX; the sums' order differs, so results may differ from AMX's in the last bits of fp32 before rounding.
#ifdef PENSIEVE_BF16_DOT
constexpr int64_t kDotRows = 12;
constexpr int64_t kDotAhead = 4096;

template <int TM>
PENSIEVE_BF16_DOT_TARGET void dot_tile(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w, int64_t K,
                                       bool ahead, float* acc_out) {
  constexpr int S = TM <= 2 ? 2 : 1;  // accumulator sets, over alternating k pairs
  __m512 acc[S][TM][2];
  for (int s = 0; s < S; ++s)
    for (int m = 0; m < TM; ++m) acc[s][m][0] = acc[s][m][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kp0 = 0; kp0 < pairs; kp0 += S) {
    for (int s = 0; s < S && kp0 + s < pairs; ++s) {
      const int64_t kp = kp0 + s;
      const char* row = reinterpret_cast<const char*>(w + kp * 2 * kPackN);
      if (ahead) {
        __builtin_prefetch(row + kDotAhead, 0, 2);
        __builtin_prefetch(row + kDotAhead + 64, 0, 2);
      }
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row), w1 = (__m512bh)_mm512_loadu_si512(row + 64);
      for (int m = 0; m < TM; ++m) {
        int32_t xp;
        std::memcpy(&xp, x + m * x_stride + 2 * kp, sizeof(xp));  // (x[m][2kp], x[m][2kp + 1])
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp);
        acc[s][m][0] = _mm512_dpbf16_ps(acc[s][m][0], xb, w0);
        acc[s][m][1] = _mm512_dpbf16_ps(acc[s][m][1], xb, w1);
      }
    }
  }
  for (int m = 0; m < TM; ++m) {
    for (int v = 0; v < 2; ++v) {
      __m512 sum = acc[0][m][v];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][m][v]);
      _mm512_storeu_ps(acc_out + m * kPackN + v * 16, sum);
    }
  }
}

template <int... Ms>
constexpr auto dot_tiles(std::integer_sequence<int, Ms...>) {
  using Tile = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, bool, float*);
  return std::array<Tile, sizeof...(Ms)>{dot_tile<Ms + 1>...};
}

void linear_dot(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* packed, const c10::BFloat16* bias,
                c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  static constexpr auto tiles = dot_tiles(std::make_integer_sequence<int, kDotRows>{});
  const int64_t n_blocks = (N + kPackN - 1) / kPackN;
  const int64_t num_tiles = (M + kDotRows - 1) / kDotRows, tile_rows = (M + num_tiles - 1) / num_tiles;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kDotRows * kPackN];
    for (int64_t nb = begin; nb < end; ++nb) {  // a thread's blocks are contiguous: one stream
      const c10::BFloat16* w = packed + nb * K * kPackN;
      const int64_t n0 = nb * kPackN, cols = std::min(kPackN, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += tile_rows) {
        const int64_t rows = std::min(tile_rows, M - m0);
        tiles[rows - 1](x + m0 * x_stride, x_stride, w, K, m0 == 0, acc);
        store_block(acc, rows, cols, bias ? bias + n0 : nullptr, out + m0 * N + n0, N);
      }
    }
  });
}
#endif

template <int... Ms>
constexpr auto fma_kernels(std::integer_sequence<int, Ms...>) {
  using Kernel = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t);
  return std::array<Kernel, sizeof...(Ms)>{linear_packed_fma<Ms + 1>...};
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t N) {
  const auto type = x.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kBFloat16, "linear_packed takes fp32 or bf16, got ", type);
  TORCH_CHECK_VALUE(packed.scalar_type() == type, "x dtype ", type, " != packed weight dtype ", packed.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu() && (!bias || bias->device().is_cpu()),
                    "pensieve_cpu::linear_packed takes CPU tensors");
  TORCH_CHECK_VALUE(x.dim() >= 1 && packed.dim() == 2 && packed.is_contiguous() && N >= 1 &&
                        packed.size(0) == (N + kPackN - 1) / kPackN && packed.size(1) == x.size(-1) * kPackN,
                    "packed weight ", packed.sizes(), " does not hold N = ", N, " outputs of K = ", x.size(-1),
                    " (pack it with pack_weight)");
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == type),
                    "bias must be [N] in the weight's dtype");
  const int64_t K = x.size(-1);
  const int64_t M = K > 0 ? x.numel() / K : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  AT_DISPATCH_SWITCH(type, "pensieve_linear_packed", AT_DISPATCH_CASE(at::kFloat, [&] {
    if (M <= kMaxPackedFma) {
      static constexpr auto kernels = fma_kernels(std::make_integer_sequence<int, kMaxPackedFma>{});
      kernels[M - 1](xc.data_ptr<float>(), xc.stride(0), packed.data_ptr<float>(),
                     bc ? bc->data_ptr<float>() : nullptr, out.data_ptr<float>(), N, K);
      return;
    }
    linear_packed_impl<scalar_t>(xc.data_ptr<scalar_t>(), xc.stride(0), packed.data_ptr<scalar_t>(),
                                 bc ? bc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M, N, K);
  }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
    // Widened to fp32 blocks for brgemm's fp32 kernel: plain blocks (no bf16 dot products), or VNNI blocks where
    // only pensieve's dot loop reads them and the rows are many (compute-bound: the fp32 kernel is faster there).
    const bool dot_only = bf16_dot_only();
    if (!packs_vnni() || (dot_only && M > kMaxDotRows)) {
      const at::Tensor xf = xc.to(at::kFloat).contiguous();
      linear_packed_impl<float, scalar_t>(xf.data_ptr<float>(), xf.stride(0), packed.data_ptr<scalar_t>(),
                                          bc ? bc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M, N, K,
                                          /*vnni=*/dot_only);
      return;
    }
#ifdef PENSIEVE_AMX
    if (use_amx(M, K)) {
      (M <= 16 ? linear_amx<1> : linear_amx<2>)(xc.data_ptr<scalar_t>(), xc.stride(0), packed.data_ptr<scalar_t>(),
                                                bc ? bc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M,
                                                N, K);
      return;
    }
#endif
#ifdef PENSIEVE_BF16_DOT
    if (dot_only) {
      linear_dot(xc.data_ptr<scalar_t>(), xc.stride(0), packed.data_ptr<scalar_t>(),
                 bc ? bc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M, N, K);
      return;
    }
#endif
    linear_packed_impl<scalar_t>(xc.data_ptr<scalar_t>(), xc.stride(0), packed.data_ptr<scalar_t>(),
                                 bc ? bc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M, N, K);
  }));
  return out;
}

// Whether brgemm runs here for this dtype: tried once on a small problem against a plain sum (oneDNN's micro-kernels
// need AVX-512 for fp32 and AMX for bf16's VNNI layout; elsewhere they throw or are absent).
bool can_pack(at::ScalarType type) {
  static std::once_flag once[2];
  static bool ok[2] = {false, false};
  if (type != at::kFloat && type != at::kBFloat16) return false;
  const int slot = type == at::kBFloat16;
  std::call_once(once[slot], [&] {
    try {
      const int64_t N = 40, K = 18, M = 3;
      at::Tensor w = at::arange(N * K, at::TensorOptions().dtype(at::kFloat)).remainder(7).sub(3).reshape({N, K});
      at::Tensor x = at::arange(M * K, at::TensorOptions().dtype(at::kFloat)).remainder(5).sub(2).reshape({M, K});
      at::Tensor ref = at::linear(x, w);  // small integers: exact in fp32 and bf16
      at::Tensor got = linear_packed(x.to(type), pack_weight(w.to(type)), std::nullopt, N).to(at::kFloat);
      ok[slot] = got.equal(ref);
    } catch (const std::exception&) {
      ok[slot] = false;
    }
  });
  return ok[slot];
}

// ---- bf16 on CPUs without bf16 dot products (AVX2; AVX-512 without BF16) ----
//
// There at::linear's bf16 GEMM is a generic loop: 14 GFLOP/s at M = 512 on a 2-core AMD EPYC (Zen 2, AVX2) against
// MKL's fp32 sgemm at 135 (docs/performance.md), which made a bf16 prefill ~10x slower than an fp32 one. bf16 rows
// past max_rows are widened instead: x is converted to fp32 once; each thread takes panels of weight rows, converts
// a panel into an fp32 buffer of its own (kWidenPanel x K: L2-sized), multiplies it by sgemm (one thread each) and
// writes the panel's outputs back in bf16 (bias added in fp32). Products of bf16 values are exact in fp32 and summed in
// fp32, as in the native bf16 kernels; the weights are read once, in bf16.
// Where the CPU has bf16 dot products (cpu_has_bf16_dot), oneDNN's bf16 GEMM behind at::linear uses them and stays
// the faster path for unpacked rows past the streaming kernel.
constexpr int64_t kWidenPanel = 64;  // weight rows per panel, at most

// The BLAS sgemm torch links (MKL's in the x86 wheels), called directly: ATen's cpublas::gemm is not exported to
// extensions, and at::mm per panel pays the dispatcher per call. Weak, so a torch without it still loads this file
// (then at::mm_out computes the panel).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// Row-major c [M, nr] = x [M, K] . w [nr, K]^T, on the calling thread.
void panel_gemm(const float* x, const float* w, float* c, int64_t M, int64_t nr, int64_t K) {
  if (sgemm_ != nullptr && std::max({M, nr, K}) < (int64_t{1} << 31)) {
    // column-major: C^T [nr x M] = W [nr x K] . X^T
    const int m = static_cast<int>(nr), n = static_cast<int>(M), k = static_cast<int>(K);
    const float one = 1.0f, zero = 0.0f;
    sgemm_("T", "N", &m, &n, &k, &one, w, &k, x, &k, &zero, c, &m);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor ct = at::from_blob(c, {M, nr}, opts);
  at::mm_out(ct, at::from_blob(const_cast<float*>(x), {M, K}, opts),
             at::from_blob(const_cast<float*>(w), {nr, K}, opts).t());
}

void linear_bf16_widened(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::Tensor& out, int64_t M, int64_t N, int64_t K) {
  using Vec = Vectorized<float>;
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
  const std::optional<at::Tensor> bf = bias ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  // Panels of equal size, their count a multiple of the threads (e.g. N = 576: 10 panels of 64 rows left a thread
  // idle for one panel in ten; 10 of 58 do not).
  int64_t panels = ((N + kWidenPanel - 1) / kWidenPanel + threads - 1) / threads * threads;
  const int64_t rows = ((N + panels - 1) / panels + 7) / 8 * 8;
  panels = (N + rows - 1) / rows;
  const c10::BFloat16* w = weight.data_ptr<c10::BFloat16>();
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf ? bf->data_ptr<float>() : nullptr;
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w32(rows * K), c32(M * rows);
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t n0 = panel * rows, nr = std::min(rows, N - n0);
      widen_bf16(w + n0 * K, w32.data(), nr * K);
      panel_gemm(xp, w32.data(), c32.data(), M, nr, K);
      for (int64_t m = 0; m < M; ++m) {
        float* c = c32.data() + m * nr;
        if (bp != nullptr) {
          int64_t j = 0;
          for (; j + Vec::size() <= nr; j += Vec::size()) (Vec::loadu(c + j) + Vec::loadu(bp + n0 + j)).store(c + j);
          for (; j < nr; ++j) c[j] += bp[n0 + j];
        }
        at::vec::convert(c, op + m * N + n0, nr);
      }
    }
  });
}

// out = x @ weight^T + bias. With `packed` (pack_weight(weight)), min_packed_rows..kMaxPackedRows rows use it.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& packed) {
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
  if (packed && M >= min_packed_rows(type) && M <= max_packed_rows(type)) return linear_packed(x, *packed, bias, N);
  const bool supported = type == at::kFloat || type == at::kDouble || type == at::kBFloat16;
  const bool widen = type == at::kBFloat16 && M > max_rows(type) && !cpu_has_bf16_dot();
  if (!supported || (M > max_rows(type) && !widen) || M == 0 || K == 0) return at::linear(x, weight, bias);
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const at::Tensor wc = weight.contiguous();
  const std::optional<at::Tensor> bc = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (widen) {
    linear_bf16_widened(xc, wc, bc, out, M, N, K);
    return out;
  }
  if (type == at::kBFloat16) {
    using bf16 = c10::BFloat16;
#ifdef PENSIEVE_STREAMING_BF16_DOT
    if (bf16_dot_ready()) {
      using D = DotBf16Native;
      auto run = M == 1   ? linear_small<bf16, 1, bf16, D>
                 : M == 2 ? linear_small<bf16, 2, bf16, D>
                          : linear_small<bf16, 4, bf16, D>;
      run(xc.data_ptr<bf16>(), xc.stride(0), wc.data_ptr<bf16>(), bc ? bc->data_ptr<bf16>() : nullptr,
          out.data_ptr<bf16>(), M, N, K);
      return out;
    }
#endif
    // no bf16 dot products: x to fp32 once, not once per weight tile
    const at::Tensor xf = xc.to(at::kFloat).contiguous();
    auto run = M == 1 ? linear_small<bf16, 1, float> : M == 2 ? linear_small<bf16, 2, float> : linear_small<bf16, 4, float>;
    run(xf.data_ptr<float>(), xf.stride(0), wc.data_ptr<bf16>(), bc ? bc->data_ptr<bf16>() : nullptr,
        out.data_ptr<bf16>(), M, N, K);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(type, "pensieve_linear", [&] {
    auto run = M == 1 ? linear_small<scalar_t, 1> : M == 2 ? linear_small<scalar_t, 2> : linear_small<scalar_t, 4>;
    run(xc.data_ptr<scalar_t>(), xc.stride(0), wc.data_ptr<scalar_t>(), bc ? bc->data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), M, N, K);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pensieve_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? packed=None) -> Tensor");
  m.def("pack_weight(Tensor weight) -> Tensor");
  m.def("can_pack(ScalarType dtype) -> bool", &can_pack);
  m.def("packs_bf16_vnni() -> bool", &packs_vnni);  // bf16 weights pack in VNNI pairs (else: plain, widened)
  m.def("brgemm_bf16() -> bool", &bf16_vnni);        // oneDNN's brgemm has a bf16 kernel here (AMX)
  m.def("uses_bf16_dot() -> bool", &bf16_dot_ready);  // pensieve's vdpbf16ps kernels (AVX-512 BF16)
  m.def("uses_amx() -> bool", &amx_ready);  // pensieve's AMX kernels (bf16 linears of 1..32 rows, bf16 scores)
}

TORCH_LIBRARY_IMPL(pensieve_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack_weight", &pack_weight);
}

}  // namespace pensieve_cpu
