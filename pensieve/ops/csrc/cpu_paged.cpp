// Paged multi-query attention and the KV scatter on CPU, reading KV blocks in place (no gather copy).
//
// Ops (schema in TORCH_LIBRARY below; fake impls in pensieve/ops/cpu_kernel.py):
//   pensieve_cpu::write_kv(k, v, k_cache!, v_cache!, slot_mapping)
//   pensieve_cpu::paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale,
//                                 sliding_window, softcap) -> out
//   pensieve_cpu::paged_attention_out(..., out!): the same into a given tensor (tests poison it first)
// Same contract as pensieve::paged_attention (pensieve/ops/attention.py).
// int8 caches (kv_dtype="int8", pensieve/ops/quant.py): rows of head_dim int8 values then their fp32 scale and
// minimum, so the caches are [num_blocks, block_size, Hkv, head_dim + 8] int8 and q, out, k, v float32. write_kv quantizes each row;
// the attention dequantizes a block's rows into fp32 scratch as it reaches them (the path bf16 blocks take) and runs
// the fp32 kernel on them. Every index these kernels follow is
// checked first (ValueError): a bad table or slot can never make them read or write outside the pools.
//
// Work split (flash-decoding): a work item is (sequence, KV head, tile of up to kQueryTile queries, key split).
// An item computes all G query heads of its KV head together, so every K/V row is read once per group. Long key
// ranges are split so that there are enough items to keep every thread busy; the partial (max, sum, acc) of the
// splits are combined at the end. Items are dealt to threads longest-first (LPT), one bucket per thread.
// Inner loops use at::vec (AVX-512 or AVX2, chosen when the extension is built) with fp32 accumulation
// (fp64 for double inputs); bf16 scores go through AMX tiles where the CPU has them (amx_block_scores). Sequences
// with many queries and no softcap go to gather + SDPA instead: there the work is GEMM-shaped and ATen's flash
// kernel is faster than this one.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/arange.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "amx.h"
#include "bf16_dot.h"
#include "reduce_lanes.h"

namespace pensieve_cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kQueryTile = 16;       // queries per work item, at most
constexpr int64_t kMaxRows = 128;        // (query, head) rows per work item, at most (unless Hq is larger)
constexpr int64_t kMinSplitKeys = 128;   // a key split is at least this long (64: 1.1-1.3x slower at batch 1-2)
constexpr int64_t kItemsPerThread = 8;   // split long ranges until there are about this many items per thread
constexpr int64_t kMaxVecs = 32;         // head_dim <= kMaxVecs * vector width

struct Problem {
  int64_t num_seqs, num_tokens, num_q_heads, num_kv_heads, group, head_dim, block_size, num_blocks, table_cols;
  int64_t window;  // 0: none
  double scale;
  std::optional<double> softcap;
  const int32_t* tables;
  const int32_t* cu;
  const int32_t* seq_lens;
  bool amx_scores = false;  // bf16: q . k by AMX tiles (amx_scores_apply)
  bool dot_scores = false;  // bf16: q . k by vdpbf16ps (dot_scores_apply)
  const int8_t* k8 = nullptr;  // an int8 cache (float32 q): its packed rows, dequantized per block
  const int8_t* v8 = nullptr;
};

constexpr int64_t kParamBytes = 8;  // an int8 row's fp32 scale and fp32 minimum, after its head_dim values

struct Item {
  int64_t seq, q_begin, q_end;  // queries [q_begin, q_end) of the sequence (0-based within it), all heads
  int64_t key_begin, key_end;         // keys [key_begin, key_end)
  int64_t partial;                    // -1: writes the output; else where its partial result starts (elements)
  int64_t cost;
};

// ---- validation: everything an index depends on --------------------------------------------------------------

void check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                     double scale, std::optional<int64_t> sliding_window, std::optional<double> softcap) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [T, Hq, D], got rank ", q.dim());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, Hkv, D], got rank ", k_cache.dim());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(), " differs from k_cache shape ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache dtype ", v_cache.scalar_type(),
                    " != k_cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(quantized ? q.scalar_type() == at::kFloat : q.scalar_type() == k_cache.scalar_type(), "q dtype ",
                    q.scalar_type(), quantized ? " != float32 (an int8 cache's)" : " != k_cache dtype ",
                    k_cache.scalar_type());
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &cu_seqlens_q, &seq_lens_k}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "all tensors must be on the CPU, got ", t->device());
  }
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(),
                    "block_tables must be a contiguous int32 [B, max_blocks]");
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous(),
                    "cu_seqlens_q must be a contiguous int32 [B + 1]");
  TORCH_CHECK_VALUE(seq_lens_k.dim() == 1 && seq_lens_k.scalar_type() == at::kInt && seq_lens_k.is_contiguous(),
                    "seq_lens_k must be a contiguous int32 [B]");
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == num_seqs + 1, "cu_seqlens_q has ", cu_seqlens_q.size(0),
                    " entries, expected num_seqs + 1 = ", num_seqs + 1);
  TORCH_CHECK_VALUE(seq_lens_k.size(0) == num_seqs, "seq_lens_k has ", seq_lens_k.size(0),
                    " entries, expected num_seqs = ", num_seqs);
  const int64_t cache_dim = k_cache.size(3) - (quantized ? kParamBytes : 0);
  TORCH_CHECK_VALUE(q.size(2) == cache_dim, "q head_dim ", q.size(2), " != cache head_dim ", cache_dim);
  TORCH_CHECK_VALUE(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, "Hq=", q.size(1),
                    " is not a multiple of Hkv=", k_cache.size(2));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a positive finite float, got ", scale);
  TORCH_CHECK_VALUE(!sliding_window || *sliding_window > 0, "sliding_window must be None or > 0");
  TORCH_CHECK_VALUE(!softcap || *softcap > 0, "softcap must be None or > 0");

  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens_k.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0), cols = block_tables.size(1);
  TORCH_CHECK_VALUE(cu[0] == 0, "cu_seqlens_q must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "cu_seqlens_q must be non-decreasing");
  }
  TORCH_CHECK_VALUE(cu[num_seqs] == q.size(0), "cu_seqlens_q ends at ", cu[num_seqs], " but q has ", q.size(0),
                    " tokens");
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = cu[b + 1] - cu[b];
    TORCH_CHECK_VALUE(lens[b] >= q_len, "seq_lens_k < q_len for sequence ", b, ": ", lens[b], " < ", q_len);
    const int64_t needed = (lens[b] + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(needed <= cols, "block table too short: sequence ", b, " needs ", needed, " blocks, block_tables has ",
                      cols, " columns");
    if (q_len == 0) continue;
    for (int64_t c = 0; c < needed; ++c) {
      const int32_t id = tables[b * cols + c];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block id ", id, " out of range [0, ", num_blocks,
                        ") in block_tables");
    }
  }
}

// ---- vector helpers -------------------------------------------------------------------------------------------

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// n (<= vector width) elements of src as a vector of acc_t; lanes past n are 0.
template <typename scalar_t>
inline Vectorized<acc_t<scalar_t>> load_acc(const scalar_t* src, int64_t n) {
  using Vec = Vectorized<acc_t<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return n == Vec::size() ? Vec::loadu(src) : Vec::loadu(src, n);
  } else {
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float<scalar_t>(src, out);
      return out;
    }
    alignas(64) float tmp[Vec::size()] = {0};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(src[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // AVX-512/AVX2 polynomial; inputs below ln(FLT_MIN) give 0, so -inf scores give 0
  } else {
    alignas(64) T tmp[Vectorized<T>::size()];
    x.store(tmp);
    for (auto& t : tmp) t = std::exp(t);
    return Vectorized<T>::loadu(tmp);
  }
}

// Queries per work item: all Hq heads of each query are rows of the item; at most kMaxRows rows.
inline int64_t query_tile(const Problem& p) { return std::clamp<int64_t>(kMaxRows / p.num_q_heads, 1, kQueryTile); }

// A split item's partial result: [the item's rows][D + 2] (unnormalized output, running max, running sum); the
// splits of one (sequence, query tile) lie one after another in the op's partial buffer.

// Prefetches `bytes` from `ptr` into L2 in `parts` calls of step(). Into L2 (a hint of 2): measured faster than
// into L1 or the LLC; spread over the block's computation rather than issued in one burst at its start (which stalls
// the core once the fill buffers are full: fp32 2-12% faster, bf16 ~30%, op benchmark, 30 layers of 4-6 x 2000 keys).
class LinePrefetcher {
 public:
  LinePrefetcher() = default;
  LinePrefetcher(const void* ptr, int64_t bytes, int64_t parts)
      : p_(static_cast<const char*>(ptr)), end_(p_ + bytes), per_step_((bytes / 64 + parts - 1) / parts * 64) {}
  inline void step() {
    const char* stop = std::min(p_ + per_step_, end_);
    for (; p_ < stop; p_ += 64) __builtin_prefetch(p_, 0, 2);
  }

 private:
  const char* p_ = nullptr;
  const char* end_ = nullptr;
  int64_t per_step_ = 0;
};

// rows packed int8 rows (head_dim values, then the fp32 scale and minimum) -> fp32 [rows][D] at dst:
// (q + 128) * scale + lo, as pensieve/ops/quant.py defines it (the loop vectorizes: sign-extend, convert, add,
// fused multiply-add).
inline void dequant_rows(const int8_t* src, int64_t rows, int64_t D, float* dst) {
  const int64_t stride = D + kParamBytes;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = src + r * stride;
    float scale, lo;
    std::memcpy(&scale, row + D, sizeof(float));
    std::memcpy(&lo, row + D + sizeof(float), sizeof(float));
    float* out = dst + r * D;
    for (int64_t d = 0; d < D; ++d) out[d] = (static_cast<float>(row[d]) + 128.f) * scale + lo;
  }
}

template <typename scalar_t>
struct Scratch {
  using acc = acc_t<scalar_t>;
  std::vector<acc> q, out, scores, row_max, row_sum, k_block, v_block;  // v_block: int8 caches only
  std::vector<uint32_t> q_pairs;  // AMX scores: the item's queries as B tiles (amx_query_tiles)
  void resize(int64_t rows, int64_t padded_dim, int64_t padded_block, int64_t block_numel, int64_t v_numel = 0) {
    k_block.resize(block_numel);
    v_block.resize(v_numel);
    q.assign(rows * padded_dim, 0);
    out.assign(rows * padded_dim, 0);
    scores.assign(rows * padded_block, 0);
    row_max.assign(rows, 0);
    row_sum.assign(rows, 0);
  }
};

// ---- bf16 scores by AMX tiles -------------------------------------------------------------------------------------
//
// In bf16 the kernel's arithmetic, not only its loads, sets its speed (each K element converted to fp32, then one
// FMA per element per query row): AMX takes the q . k products. Per 16 keys of a block (block_size a multiple of
// 16), KV head h and up to 16 of the item's rows of that head: S^T [16 keys x 16 rows] = K [16 keys x D] . Q_h^T,
// with the K rows loaded as A tiles straight from the pool (a 16-row tile at the pool's slot stride: no conversion,
// no copy) and the queries as B tiles in the pair-interleaved layout AMX reads (made once per item). Each row's 16
// scores are gathered out of the stored tile and scaled; masking and the online softmax are the FMA path's. Products
// of bf16 pairs are exact in fp32 and summed in fp32, as there. Keys of a tile outside the block's [j0, j1) (past a
// sequence's end, before a window's start) are computed and dropped: their rows never reach a score.
constexpr int64_t kAmxKeys = 16;   // keys per A tile (tile rows)
constexpr int64_t kAmxCols = 16;   // item rows per B tile (tile columns)
constexpr int64_t kAmxDepth = 32;  // head_dim elements per tile product (16 pairs)

inline bool amx_scores_apply(at::ScalarType type, int64_t head_dim, int64_t block_size) {
  return type == at::kBFloat16 && head_dim % kAmxDepth == 0 && block_size % kAmxKeys == 0 && amx_ready();
}

#ifdef PENSIEVE_AMX
// Row r of the item (query i, q head h * G + g) is column (i * G + g) % 16 of B tile (h, (i * G + g) / 16, dc);
// a B tile holds 16 pairs (rows) x 16 columns of one 32-element slice dc of head_dim.
inline int64_t amx_row_groups(const Problem& p, int64_t num_q) { return (num_q * p.group + kAmxCols - 1) / kAmxCols; }

void amx_query_tiles(const Problem& p, const c10::BFloat16* q, int64_t q_stride0, int64_t q_stride1, int64_t token0,
                     int64_t num_q, std::vector<uint32_t>& tiles) {
  const int64_t G = p.group, D = p.head_dim, groups = amx_row_groups(p, num_q), slices = D / kAmxDepth;
  tiles.assign(p.num_kv_heads * groups * slices * kAmxCols * kAmxCols, 0u);
  for (int64_t h = 0; h < p.num_kv_heads; ++h) {
    for (int64_t lr = 0; lr < num_q * G; ++lr) {
      const auto* src =
          reinterpret_cast<const uint32_t*>(q + (token0 + lr / G) * q_stride0 + (h * G + lr % G) * q_stride1);
      uint32_t* dst = tiles.data() + (h * groups + lr / kAmxCols) * slices * kAmxCols * kAmxCols + lr % kAmxCols;
      for (int64_t pair = 0; pair < D / 2; ++pair) {
        dst[(pair / kAmxCols) * kAmxCols * kAmxCols + (pair % kAmxCols) * kAmxCols] = src[pair];
      }
    }
  }
}

// Tiles: 0 = A (K rows), 1 = B (queries), 2 = C (scores); loaded once per thread by the op.
inline void amx_scores_config() {
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) cfg.set(t, 16, 64);
  _tile_loadconfig(&cfg);
}

// The scores of keys [j0, j1) of block `block` (column `col` of the sequence's table) for every row of the item,
// into s.scores[r * score_stride + key - j0], by tiles of 16 keys (the block's, from its start). `pk` (the next
// block's K lines) steps once per tile product.
void amx_block_scores(const Problem& p, const Item& it, int32_t block, int64_t col, int64_t j0, int64_t j1,
                      const c10::BFloat16* k_cache, Scratch<c10::BFloat16>& s, int64_t score_stride, int64_t groups,
                      LinePrefetcher& pk) {
  const int64_t bs = p.block_size, D = p.head_dim, G = p.group, Hq = p.num_q_heads, Hkv = p.num_kv_heads;
  const int64_t item_rows = (it.q_end - it.q_begin) * G, slices = D / kAmxDepth, slot_numel = Hkv * D;
  const __m512i lane_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(kAmxCols));
  const __m512 scale = _mm512_set1_ps(static_cast<float>(p.scale));
  alignas(64) float tile[kAmxKeys * kAmxCols];
  for (int64_t u0 = (j0 - col * bs) / kAmxKeys * kAmxKeys; col * bs + u0 < j1; u0 += kAmxKeys) {
    const int64_t key0 = col * bs + u0;
    const int64_t lo = std::max<int64_t>(j0 - key0, 0), hi = std::min<int64_t>(j1 - key0, kAmxKeys);
    const auto valid = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    const c10::BFloat16* keys = k_cache + (static_cast<int64_t>(block) * bs + u0) * slot_numel;
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t cg = 0; cg < groups; ++cg) {
        const uint32_t* queries = s.q_pairs.data() + (h * groups + cg) * slices * kAmxCols * kAmxCols;
        _tile_zero(2);
        for (int64_t dc = 0; dc < slices; ++dc) {
          _tile_loadd(0, keys + h * D + dc * kAmxDepth, slot_numel * 2);
          _tile_loadd(1, queries + dc * kAmxCols * kAmxCols, kAmxCols * 4);
          _tile_dpbf16ps(2, 0, 1);
          pk.step();
        }
        _tile_stored(2, tile, kAmxCols * 4);
        for (int64_t c = 0; c < std::min(kAmxCols, item_rows - cg * kAmxCols); ++c) {
          const int64_t lr = cg * kAmxCols + c, r = lr / G * Hq + h * G + lr % G;
          const __m512 v = _mm512_mul_ps(
              _mm512_i32gather_ps(_mm512_add_epi32(lane_offsets, _mm512_set1_epi32(static_cast<int>(c))), tile, 4),
              scale);
          float* row = s.scores.data() + r * score_stride;
          if (lo == 0) {
            _mm512_mask_storeu_ps(row + (key0 - j0), valid, v);
          } else {  // the tile starts before j0 (a window's first block)
            alignas(64) float lanes[kAmxKeys];
            _mm512_store_ps(lanes, v);
            for (int64_t l = lo; l < hi; ++l) row[key0 + l - j0] = lanes[l];
          }
        }
      }
    }
  }
}
#endif

// Rows of an item: r = (i - q_begin) * Hq + query head, so the rows of one query and KV head h are the G rows from
// (i - q_begin) * Hq + h * G, and the item's output rows are contiguous in `out`. The block's memory is read front
// to back (all KV heads of a slot together; 12 KB per block for SmolLM2 in fp32), and the next block of the
// sequence is prefetched while this one is computed (LinePrefetcher). NV: vectors per head_dim row, a compile-time
// constant for the common head dims that are a whole number of vectors (registers, unrolled loops), 0 for others.
// ---- bf16 scores by AVX-512 BF16 dot products (no AMX: AMD Zen 4/5, Sapphire Rapids with AMX off) -------------
//
// The FMA path's loop (W keys' accumulators, reduced together by reduce_lanes), with vdpbf16ps taking 32 head_dim
// elements of q and of each key per instruction, K read straight from the pool (no fp32 copy of the block) and q
// from the op's input (no scaled fp32 copy); the sums are scaled afterwards, as the AMX path does. Products of bf16
// pairs are exact in fp32 and summed in fp32. Compiled where the build's flags have AVX-512 BF16 (cpu_kernel.py adds
// them where the CPU reports it), used where bf16_dot_ready().
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define PENSIEVE_DOT_SCORES 1
constexpr int64_t kDotDepth = 32;  // head_dim elements per vdpbf16ps

// scores[r][t0 + u] for u < m (<= 16) of KV head h's keys `kt` (slot stride slot_numel), row r's query `qr`.
inline void dot_key_scores(const c10::BFloat16* qr, const c10::BFloat16* kt, int64_t slot_numel, int64_t D,
                           int64_t m, float scale, float* dst) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec dots[W];
  for (int64_t u = 0; u < W; ++u) dots[u] = Vec(0);
  for (int64_t c = 0; c < D; c += kDotDepth) {  // c outer, keys inner: W independent accumulators
    const __m512bh qc = (__m512bh)_mm512_loadu_si512(qr + c);
    if (m == W) {
      for (int64_t u = 0; u < W; ++u)
        dots[u] = Vec(_mm512_dpbf16_ps(dots[u], qc, (__m512bh)_mm512_loadu_si512(kt + u * slot_numel + c)));
    } else {
      for (int64_t u = 0; u < m; ++u)
        dots[u] = Vec(_mm512_dpbf16_ps(dots[u], qc, (__m512bh)_mm512_loadu_si512(kt + u * slot_numel + c)));
    }
  }
  (reduce_lanes<float>(dots) * Vec(scale)).store(dst);
}
#endif

inline bool dot_scores_apply(at::ScalarType type, int64_t head_dim, bool amx_scores) {
#ifdef PENSIEVE_DOT_SCORES
  return type == at::kBFloat16 && !amx_scores && head_dim % kDotDepth == 0 && bf16_dot_ready();
#else
  return false;
#endif
}

template <typename scalar_t, int NV>
void run_item(const Problem& p, const Item& it, const scalar_t* q, int64_t q_stride0, int64_t q_stride1,
              const scalar_t* k_cache, const scalar_t* v_cache, scalar_t* out, acc_t<scalar_t>* partials,
              Scratch<scalar_t>& s) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kVecs = NV > 0 ? NV : kMaxVecs;
  const int64_t D = p.head_dim, G = p.group, Hq = p.num_q_heads, Hkv = p.num_kv_heads, bs = p.block_size;
  const int64_t nv = NV > 0 ? NV : (D + W - 1) / W, Dp = nv * W, BSp = (bs + W - 1) / W * W;
  const int64_t tail = NV > 0 ? W : D - (nv - 1) * W;  // elements in a row's last vector (NV > 0: D = NV * W)
  const int64_t num_q = it.q_end - it.q_begin, rows = num_q * Hq;
  // bf16/fp16 K: each block is converted to fp32 once (into s.k_block), not once per query row (bf16 with AMX: not
  // at all). V rows are converted in registers, once per pass of the p . V loop.
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc>;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool quant = kFloat && p.k8 != nullptr;  // an int8 cache: K and V blocks dequantized into s.k_block/v_block
  s.resize(rows, Dp, BSp, kConvert || quant ? bs * Hkv * D : 0, quant ? bs * Hkv * D : 0);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  auto load_row = [&](const acc* src, Vec* dst) {
    for (int64_t c = 0; c < nv - 1; ++c) dst[c] = Vec::loadu(src + c * W);
    dst[nv - 1] = tail == W ? Vec::loadu(src + (nv - 1) * W) : Vec::loadu(src + (nv - 1) * W, tail);
  };
  auto block_rows = [&](const scalar_t* src, int64_t numel, std::vector<acc>& buf) -> const acc* {
    if constexpr (kConvert) {
      for (int64_t e = 0; e < numel; e += W) {
        const int64_t m = std::min(W, numel - e);
        load_acc(src + e, m).store(buf.data() + e, m);
      }
      return buf.data();
    } else {
      return src;
    }
  };

  const int64_t q_len = p.cu[it.seq + 1] - p.cu[it.seq];
  const int64_t first_pos = p.seq_lens[it.seq] - q_len;  // position of query 0
  const int64_t token0 = p.cu[it.seq] + it.q_begin;
  std::fill(s.row_max.begin(), s.row_max.end(), neg_inf);
#ifdef PENSIEVE_AMX
  const bool amx = std::is_same_v<scalar_t, c10::BFloat16> && p.amx_scores;
  const int64_t amx_groups = amx ? amx_row_groups(p, num_q) : 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx) amx_query_tiles(p, q, q_stride0, q_stride1, token0, num_q, s.q_pairs);
  }
#else
  constexpr bool amx = false;
  constexpr int64_t amx_groups = 0;
#endif
#ifdef PENSIEVE_DOT_SCORES
  const bool dot = std::is_same_v<scalar_t, c10::BFloat16> && p.dot_scores;
#else
  constexpr bool dot = false;
#endif
  for (int64_t r = 0; r < rows && !amx && !dot; ++r) {  // queries, pre-scaled by `scale` (the FMA score loop's)
    const scalar_t* src = q + (token0 + r / Hq) * q_stride0 + (r % Hq) * q_stride1;
    acc* dst = s.q.data() + r * Dp;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc>(src[d]) * static_cast<acc>(p.scale);
  }
  // p . V rows of one KV head in passes of up to kPvRows (registers: kPvRows x nv accumulators + nv V vectors)
  // accumulators and one broadcast weight per row, plus one V vector: R * (NV + 1) + 1 vector registers (16 with
  // AVX2, 32 with AVX-512); more spills the accumulators to the stack inside the key loop.
  constexpr int64_t kVecRegs = sizeof(Vec) >= 64 ? 32 : 16;
  constexpr int64_t kPvRows = NV > 0 ? std::clamp<int64_t>((kVecRegs - 1) / (NV + 1), 1, 4) : 1;
  const int64_t pv_passes = Hkv * ((num_q * G + kPvRows - 1) / kPvRows);

  const int64_t lo_pos = first_pos + it.q_begin, hi_pos = first_pos + it.q_end - 1;  // query positions in the tile
  const int64_t slot_numel = Hkv * D, slot_bytes = slot_numel * static_cast<int64_t>(sizeof(scalar_t));
  const int32_t* table = p.tables + it.seq * p.table_cols;
  const int64_t last_col = (it.key_end - 1) / bs;

  for (int64_t col = it.key_begin / bs; col <= last_col; ++col) {
    const int64_t j0 = std::max(col * bs, it.key_begin), j1 = std::min((col + 1) * bs, it.key_end), n = j1 - j0;
    const int64_t slot0 = static_cast<int64_t>(table[col]) * bs + (j0 - col * bs);
    const acc* kb = nullptr;
    if constexpr (kFloat) {
      if (quant) {
        dequant_rows(p.k8 + slot0 * Hkv * (D + kParamBytes), n * Hkv, D, s.k_block.data());
        kb = s.k_block.data();
      }
    }
    if (!quant && !amx && !dot) kb = block_rows(k_cache + slot0 * slot_numel, n * slot_numel, s.k_block);
    // The next block's lines are requested a few at a time while this block is computed (after each row and W keys
    // of the score loop, or each tile product with AMX, and each pass of the V loop), so that its loads overlap the
    // arithmetic instead of stalling it in one burst.
    LinePrefetcher pk, pv;
    if (col < last_col && quant) {
      const int64_t bytes = bs * Hkv * (D + kParamBytes), next = static_cast<int64_t>(table[col + 1]) * bytes;
      pk = LinePrefetcher(p.k8 + next, bytes, rows * (BSp / W));
      pv = LinePrefetcher(p.v8 + next, bytes, pv_passes);
    } else if (col < last_col) {
      const int64_t next = static_cast<int64_t>(table[col + 1]) * bs * slot_numel;
      // as many parts as the score loop calls step(): per tile product (AMX), else per row and W keys (spreading
      // the lines over half the loop, as rows alone did on 8-wide AVX2, was 14-16% slower from memory)
      const int64_t k_steps = amx ? bs / kAmxKeys * Hkv * amx_groups * (D / kAmxDepth) : rows * (BSp / W);
      pk = LinePrefetcher(k_cache + next, bs * slot_bytes, k_steps);
      pv = LinePrefetcher(v_cache + next, bs * slot_bytes, pv_passes);
    }
    // A key is hidden from some row iff it lies after the tile's first query, or (window) too far behind its last.
    const bool masked = j1 - 1 > lo_pos || (p.window > 0 && hi_pos - j0 >= p.window);

#ifdef PENSIEVE_AMX
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (amx) amx_block_scores(p, it, table[col], col, j0, j1, k_cache, s, BSp, amx_groups, pk);
    }
#endif
#ifdef PENSIEVE_DOT_SCORES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (int64_t h = 0; h < Hkv && dot; ++h) {
        for (int64_t t0 = 0; t0 < n; t0 += W) {
          const c10::BFloat16* kt = k_cache + (slot0 + t0) * slot_numel + h * D;
          for (int64_t i = 0; i < num_q; ++i) {
            for (int64_t r = i * Hq + h * G; r < i * Hq + (h + 1) * G; ++r) {
              const c10::BFloat16* qr = q + (token0 + i) * q_stride0 + (r % Hq) * q_stride1;
              dot_key_scores(qr, kt, slot_numel, D, std::min(W, n - t0), static_cast<float>(p.scale),
                             s.scores.data() + r * BSp + t0);
              pk.step();
            }
          }
        }
      }
    }
#endif
    // scores[r][t] = q_r . k_t (k of the row's KV head), W slots at a time
    for (int64_t h = 0; h < Hkv && !amx && !dot; ++h) {
      for (int64_t t0 = 0; t0 < n; t0 += W) {
        const int64_t m = std::min(W, n - t0);
        for (int64_t i = 0; i < num_q; ++i) {
          for (int64_t r = i * Hq + h * G; r < i * Hq + (h + 1) * G; ++r) {
            Vec qv[kVecs], dots[W];
            const acc* qr = s.q.data() + r * Dp;
            if (m == W && tail == W) {
              // c outer, keys inner: W independent accumulators (a dependency chain per key would leave the FMA
              // units waiting on latency), one q vector live at a time (fits AVX2's 16 registers).
              const acc* kt = kb + t0 * slot_numel + h * D;
              for (int64_t u = 0; u < W; ++u) dots[u] = Vec::loadu(qr) * Vec::loadu(kt + u * slot_numel);
              for (int64_t c = 1; c < nv; ++c) {
                const Vec qc = Vec::loadu(qr + c * W);
                for (int64_t u = 0; u < W; ++u)
                  dots[u] = at::vec::fmadd(qc, Vec::loadu(kt + u * slot_numel + c * W), dots[u]);
              }
              reduce_lanes<acc>(dots).store(s.scores.data() + r * BSp + t0);
              pk.step();
              continue;
            }
            for (int64_t c = 0; c < nv; ++c) qv[c] = Vec::loadu(qr + c * W);
            for (int64_t u = 0; u < W; ++u) {
              if (u >= m) {
                dots[u] = Vec(0);
                continue;
              }
              Vec kv[kVecs];
              load_row(kb + (t0 + u) * slot_numel + h * D, kv);
              Vec a = qv[0] * kv[0];
              for (int64_t c = 1; c < nv; ++c) a = at::vec::fmadd(qv[c], kv[c], a);
              dots[u] = a;
            }
            reduce_lanes<acc>(dots).store(s.scores.data() + r * BSp + t0);
            pk.step();
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      acc* sc = s.scores.data() + r * BSp;
      if (p.softcap) {
        const acc cap = static_cast<acc>(*p.softcap);
        for (int64_t t = 0; t < n; ++t) sc[t] = cap * std::tanh(sc[t] / cap);
      }
      if (masked) {
        const int64_t pos = lo_pos + r / Hq;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = j0 + t;
          if (j > pos || (p.window > 0 && pos - j >= p.window)) sc[t] = neg_inf;
        }
      }
      for (int64_t t = n; t < BSp; ++t) sc[t] = neg_inf;
      // online softmax: new running max, rescale what was accumulated, exponentiate this block's scores
      Vec vmax(neg_inf);
      for (int64_t t = 0; t < BSp; t += W) vmax = at::vec::maximum(vmax, Vec::loadu(sc + t));
      const acc block_max = at::vec::vec_reduce_all<acc>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
      if (block_max == neg_inf) {
        for (int64_t t = 0; t < BSp; ++t) sc[t] = 0;
        continue;
      }
      const acc old_max = s.row_max[r], new_max = std::max(old_max, block_max);
      const Vec vnew(new_max);
      Vec vsum(0);
      for (int64_t t = 0; t < BSp; t += W) {
        Vec e = vexp(Vec::loadu(sc + t) - vnew);
        e.store(sc + t);
        vsum = vsum + e;
      }
      const acc block_sum = at::vec::vec_reduce_all<acc>([](Vec& x, Vec& y) { return x + y; }, vsum);
      if (old_max != new_max) {
        const acc corr = old_max == neg_inf ? acc(0) : std::exp(old_max - new_max);
        s.row_sum[r] *= corr;
        acc* o = s.out.data() + r * Dp;
        const Vec vc(corr);
        for (int64_t c = 0; c < nv; ++c) (Vec::loadu(o + c * W) * vc).store(o + c * W);
      }
      s.row_sum[r] += block_sum;
      s.row_max[r] = new_max;
    }
    // out[r] += sum_t p[r][t] * v_t: for each KV head, its rows in passes of up to kPvRows, the passes' accumulators
    // in registers across the block. Each V row is loaded (and, for bf16/fp16, converted to fp32) once per pass.
    const scalar_t* vb = nullptr;
    if constexpr (kFloat) {
      if (quant) {
        dequant_rows(p.v8 + slot0 * Hkv * (D + kParamBytes), n * Hkv, D, s.v_block.data());
        vb = s.v_block.data();
      }
    }
    if (!quant) vb = v_cache + slot0 * slot_numel;
    auto pv_pass = [&](int64_t h, int64_t lr0, auto count) {
      constexpr int64_t R = decltype(count)::value;
      acc* o[R];
      const acc* pr[R];
      Vec ov[R][kVecs];
      for (int64_t k = 0; k < R; ++k) {
        const int64_t lr = lr0 + k, r = lr / G * Hq + h * G + lr % G;
        o[k] = s.out.data() + r * Dp;
        pr[k] = s.scores.data() + r * BSp;
        for (int64_t c = 0; c < nv; ++c) ov[k][c] = Vec::loadu(o[k] + c * W);
      }
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* vrow = vb + t * slot_numel + h * D;
        Vec w[R];
        for (int64_t k = 0; k < R; ++k) w[k] = Vec(pr[k][t]);
        for (int64_t c = 0; c < nv; ++c) {  // one V vector live at a time
          const Vec vv = load_acc(vrow + c * W, c < nv - 1 ? W : tail);
          for (int64_t k = 0; k < R; ++k) ov[k][c] = at::vec::fmadd(w[k], vv, ov[k][c]);
        }
      }
      for (int64_t k = 0; k < R; ++k)
        for (int64_t c = 0; c < nv; ++c) ov[k][c].store(o[k] + c * W);
      pv.step();
    };
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t lr0 = 0; lr0 < num_q * G; lr0 += kPvRows) {
        switch (std::min(kPvRows, num_q * G - lr0)) {
          case 4: if constexpr (kPvRows >= 4) pv_pass(h, lr0, std::integral_constant<int64_t, 4>{}); break;
          case 3: if constexpr (kPvRows >= 3) pv_pass(h, lr0, std::integral_constant<int64_t, 3>{}); break;
          case 2: if constexpr (kPvRows >= 2) pv_pass(h, lr0, std::integral_constant<int64_t, 2>{}); break;
          default: pv_pass(h, lr0, std::integral_constant<int64_t, 1>{});
        }
      }
    }
  }

  if (it.partial >= 0) {
    acc* dst = partials + it.partial;
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(dst + r * (D + 2), s.out.data() + r * Dp, D * sizeof(acc));
      dst[r * (D + 2) + D] = s.row_max[r];
      dst[r * (D + 2) + D + 1] = s.row_sum[r];
    }
    return;
  }
  scalar_t* dst = out + token0 * Hq * D;
  for (int64_t r = 0; r < rows; ++r) {
    const acc inv = s.row_sum[r] > 0 ? acc(1) / s.row_sum[r] : acc(0);  // a row sees >= 1 key by contract
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<scalar_t>(s.out[r * Dp + d] * inv);
  }
}

template <typename scalar_t>
using ItemRunner = void (*)(const Problem&, const Item&, const scalar_t*, int64_t, int64_t, const scalar_t*,
                            const scalar_t*, scalar_t*, acc_t<scalar_t>*, Scratch<scalar_t>&);

template <typename scalar_t>
ItemRunner<scalar_t> item_runner(int64_t head_dim) {
  // a specialization per whole number of vectors (the row's last vector is full: no masked loads in the loops)
  constexpr int64_t W = Vectorized<acc_t<scalar_t>>::size();
  switch (head_dim % W == 0 ? head_dim / W : 0) {
    case 1: return run_item<scalar_t, 1>;
    case 2: return run_item<scalar_t, 2>;
    case 4: return run_item<scalar_t, 4>;
    case 8: return run_item<scalar_t, 8>;
    case 16: return run_item<scalar_t, 16>;
    default: return run_item<scalar_t, 0>;
  }
}

// Combine the partial results of one (sequence, query tile) split into `num` items.
template <typename scalar_t>
void combine(const Problem& p, const Item& first, int64_t num, const acc_t<scalar_t>* partials, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.head_dim, rows = (first.q_end - first.q_begin) * p.num_q_heads, split = rows * (D + 2);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  std::vector<acc> res(D);
  scalar_t* dst = out + (p.cu[first.seq] + first.q_begin) * p.num_q_heads * D;
  for (int64_t r = 0; r < rows; ++r) {
    acc m = neg_inf;
    for (int64_t s = 0; s < num; ++s) m = std::max(m, partials[first.partial + s * split + r * (D + 2) + D]);
    std::fill(res.begin(), res.end(), acc(0));
    acc total = 0;
    for (int64_t s = 0; s < num; ++s) {
      const acc* src = partials + first.partial + s * split + r * (D + 2);
      if (src[D] == neg_inf) continue;
      const acc w = std::exp(src[D] - m);
      total += src[D + 1] * w;
      for (int64_t d = 0; d < D; ++d) res[d] += src[d] * w;
    }
    const acc inv = total > 0 ? acc(1) / total : acc(0);
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<scalar_t>(res[d] * inv);
  }
}

// ---- planning: items, splits, buckets ---------------------------------------------------------------------------

// Keys the queries [q_begin, q_end) of sequence b can see: [begin, end).
std::pair<int64_t, int64_t> key_range(const Problem& p, int64_t b, int64_t q_begin, int64_t q_end) {
  const int64_t q_len = p.cu[b + 1] - p.cu[b], first_pos = p.seq_lens[b] - q_len;
  const int64_t end = first_pos + q_end;
  const int64_t begin = p.window > 0 ? std::max<int64_t>(0, first_pos + q_begin - p.window + 1) : 0;
  return {begin, end};
}

struct Plan {
  std::vector<Item> items;
  std::vector<std::pair<int64_t, int64_t>> groups;  // split items: (first item index, count)
  std::vector<std::vector<int64_t>> buckets;        // item indices per thread
  int64_t partial_numel = 0;                        // elements of all the partial results
};

Plan plan_items(const Problem& p, const std::vector<int64_t>& seqs, int64_t num_threads) {
  struct Base {
    int64_t seq, q_begin, q_end, key_begin, key_end;
  };
  std::vector<Base> bases;
  int64_t total_keys = 0;
  const int64_t tile = query_tile(p);
  for (int64_t b : seqs) {
    const int64_t q_len = p.cu[b + 1] - p.cu[b];
    for (int64_t q0 = 0; q0 < q_len; q0 += tile) {
      const int64_t q1 = std::min(q_len, q0 + tile);
      auto [k0, k1] = key_range(p, b, q0, q1);
      bases.push_back({b, q0, q1, k0, k1});
      total_keys += k1 - k0;
    }
  }
  Plan plan;
  const int64_t target = kItemsPerThread * num_threads;
  for (const Base& base : bases) {
    const int64_t keys = base.key_end - base.key_begin;
    int64_t splits = 1;
    if (num_threads > 1 && total_keys > 0) {
      const int64_t wanted = (keys * target + total_keys - 1) / total_keys;
      splits = std::max<int64_t>(1, std::min(wanted, keys / kMinSplitKeys));
    }
    // split points on block boundaries
    const int64_t first_col = base.key_begin / p.block_size, last_col = (base.key_end - 1) / p.block_size;
    splits = std::min(splits, last_col - first_col + 1);
    const int64_t cols_per = (last_col - first_col + 1 + splits - 1) / splits;
    const int64_t first_item = static_cast<int64_t>(plan.items.size()), rows = (base.q_end - base.q_begin) * p.num_q_heads;
    int64_t count = 0;
    for (int64_t c = first_col; c <= last_col; c += cols_per) {
      const int64_t k0 = std::max(base.key_begin, c * p.block_size);
      const int64_t k1 = std::min(base.key_end, (c + cols_per) * p.block_size);
      plan.items.push_back({base.seq, base.q_begin, base.q_end, k0, k1, -1, (k1 - k0) * (rows + 4 * p.num_kv_heads)});
      ++count;
    }
    if (count > 1) {
      const int64_t split = rows * (p.head_dim + 2);
      for (int64_t i = 0; i < count; ++i) plan.items[first_item + i].partial = plan.partial_numel + i * split;
      plan.partial_numel += count * split;
      plan.groups.emplace_back(first_item, count);
    }
  }
  // LPT: longest item first, onto the least loaded thread
  std::vector<int64_t> order(plan.items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return plan.items[a].cost > plan.items[b].cost; });
  plan.buckets.assign(num_threads, {});
  std::vector<int64_t> load(num_threads, 0);
  for (int64_t i : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan.buckets[t].push_back(i);
    load[t] += plan.items[i].cost;
  }
  return plan;
}

// ---- long prefills: gather the sequence's blocks, ATen's SDPA ---------------------------------------------------

// out[q_start + i] = the two attention results [1, Hq, q_len, D] of disjoint key sets, weighted by their
// log-sum-exps [1, Hq, q_len] (in opmath: fp32, fp64 for double), in one pass.
void merge_by_lse(const Problem& p, int64_t q_start, int64_t q_len, const at::Tensor& out_a, const at::Tensor& lse_a,
                  const at::Tensor& out_b, const at::Tensor& lse_b, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pensieve_merge_by_lse", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t Hq = p.num_q_heads, D = p.head_dim;
    const scalar_t* a = out_a.data_ptr<scalar_t>();
    const scalar_t* b = out_b.data_ptr<scalar_t>();
    const acc* la = lse_a.data_ptr<acc>();
    const acc* lb = lse_b.data_ptr<acc>();
    scalar_t* dst = out.data_ptr<scalar_t>() + q_start * Hq * D;
    const int64_t ah = out_a.stride(1), ai = out_a.stride(2), ad = out_a.stride(3);
    const int64_t bh = out_b.stride(1), bi = out_b.stride(2), bd = out_b.stride(3);
    at::parallel_for(0, q_len, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t h = 0; h < Hq; ++h) {
          const acc x = la[h * q_len + i], y = lb[h * q_len + i], top = std::max(x, y);
          acc wa = std::exp(x - top), wb = std::exp(y - top);
          const acc inv = acc(1) / (wa + wb);
          wa *= inv;
          wb *= inv;
          const scalar_t* ra = a + h * ah + i * ai;
          const scalar_t* rb = b + h * bh + i * bi;
          scalar_t* o = dst + (i * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            o[d] = static_cast<scalar_t>(static_cast<acc>(ra[d * ad]) * wa + static_cast<acc>(rb[d * bd]) * wb);
          }
        }
      }
    });
  });
}

void attend_by_sdpa(const Problem& p, int64_t b, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, at::Tensor& out) {
  const int64_t q_start = p.cu[b], q_len = p.cu[b + 1] - p.cu[b], seq_len = p.seq_lens[b];
  auto [key_begin, key_end] = key_range(p, b, 0, q_len);
  const int64_t first_col = key_begin / p.block_size, num_cols = (key_end - 1) / p.block_size - first_col + 1;
  const int64_t keys = key_end - first_col * p.block_size;  // gathered rows [first_col * bs, seq_len)
  const int64_t block_numel = p.block_size * p.num_kv_heads * p.head_dim;
  const bool quant = p.k8 != nullptr;  // an int8 cache: its rows dequantized into fp32 as they are gathered
  auto k = at::empty({num_cols * p.block_size, p.num_kv_heads, p.head_dim},
                     quant ? q.options().memory_format(at::MemoryFormat::Contiguous) : k_cache.options());
  auto v = at::empty_like(k);
  const int32_t* table = p.tables + b * p.table_cols + first_col;
  const int64_t item = k_cache.element_size();
  const int64_t packed = p.block_size * p.num_kv_heads * (p.head_dim + kParamBytes);
  for (int64_t c = 0; c < num_cols && quant; ++c) {
    const int64_t rows = p.block_size * p.num_kv_heads;
    dequant_rows(p.k8 + table[c] * packed, rows, p.head_dim, k.data_ptr<float>() + c * block_numel);
    dequant_rows(p.v8 + table[c] * packed, rows, p.head_dim, v.data_ptr<float>() + c * block_numel);
  }
  for (int64_t c = 0; c < num_cols && !quant; ++c) {
    std::memcpy(static_cast<char*>(k.data_ptr()) + c * block_numel * item,
                static_cast<const char*>(k_cache.data_ptr()) + table[c] * block_numel * item, block_numel * item);
    std::memcpy(static_cast<char*>(v.data_ptr()) + c * block_numel * item,
                static_cast<const char*>(v_cache.data_ptr()) + table[c] * block_numel * item, block_numel * item);
  }
  auto kt = k.narrow(0, 0, keys).transpose(0, 1).unsqueeze(0);  // [1, Hkv, L, D]
  auto vt = v.narrow(0, 0, keys).transpose(0, 1).unsqueeze(0);
  auto qs = q.narrow(0, q_start, q_len).transpose(0, 1).unsqueeze(0);  // [1, Hq, q_len, D]
  const bool plain_causal = first_col == 0 && seq_len == q_len && p.window == 0;
  if (!plain_causal && p.window == 0) {
    // A chunk over a history (chunked prefill, a later turn, recompute): every query sees the whole history and
    // the chunk's keys up to its own. Two flash calls without a mask — the history in full, the chunk top-left
    // causal — merged by their log-sum-exps, instead of one call with a [q_len, seq_len] mask: the masked call
    // computes the whole rectangle (the chunk's upper triangle too) and reads the mask, and the mask is built
    // again in every layer (docs/performance.md).
    const int64_t hist = seq_len - q_len;
    auto [out_hist, lse_hist] = at::_scaled_dot_product_flash_attention_for_cpu(
        qs, kt.narrow(2, 0, hist), vt.narrow(2, 0, hist), 0.0, false, std::nullopt, p.scale);
    auto [out_new, lse_new] = at::_scaled_dot_product_flash_attention_for_cpu(
        qs, kt.narrow(2, hist, q_len), vt.narrow(2, hist, q_len), 0.0, true, std::nullopt, p.scale);
    merge_by_lse(p, q_start, q_len, out_hist, lse_hist.contiguous(), out_new, lse_new.contiguous(), out);
    return;
  }
  std::optional<at::Tensor> mask;
  if (!plain_causal) {
    auto query_pos = at::arange(seq_len - q_len, seq_len, at::kLong).unsqueeze(1);
    auto key_pos = at::arange(first_col * p.block_size, key_end, at::kLong).unsqueeze(0);
    auto allowed = key_pos <= query_pos;
    if (p.window > 0) allowed = allowed & ((query_pos - key_pos) < p.window);
    mask = allowed;
  }
  auto res = at::scaled_dot_product_attention(qs, kt, vt, mask, 0.0, plain_causal, p.scale,
                                              p.num_q_heads != p.num_kv_heads);  // [1, Hq, q_len, D]
  out.narrow(0, q_start, q_len).copy_(res[0].transpose(0, 1));
}

// ---- the ops ----------------------------------------------------------------------------------------------------

// Writes every row of out [T, Hq, D] (contiguous, q's dtype).
void paged_attention_out(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                         double scale, std::optional<int64_t> sliding_window, std::optional<double> softcap,
                         at::Tensor& out) {
  check_attention(q_in, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap);
  TORCH_CHECK_VALUE(out.sizes() == q_in.sizes() && out.scalar_type() == q_in.scalar_type() && out.is_contiguous() &&
                        out.device().is_cpu(),
                    "out must be a contiguous CPU tensor of q's shape and dtype");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  Problem p{block_tables.size(0), q.size(0), q.size(1), k_cache.size(2), q.size(1) / k_cache.size(2), q.size(2),
            k_cache.size(1), k_cache.size(0), block_tables.size(1), sliding_window.value_or(0), scale, softcap,
            block_tables.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(), seq_lens_k.data_ptr<int32_t>()};
  if (k_cache.scalar_type() == at::kChar) {
    p.k8 = k_cache.data_ptr<int8_t>();
    p.v8 = v_cache.data_ptr<int8_t>();
  }
  p.amx_scores = amx_scores_apply(q.scalar_type(), p.head_dim, p.block_size);
  p.dot_scores = dot_scores_apply(q.scalar_type(), p.head_dim, p.amx_scores);
  std::vector<int64_t> native, by_sdpa;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.cu[b + 1] - p.cu[b];
    if (q_len == 0) continue;
    (q_len > kQueryTile && !softcap ? by_sdpa : native).push_back(b);
  }
  if (!native.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pensieve_paged_attention", [&] {
      using acc = acc_t<scalar_t>;
      TORCH_CHECK_VALUE(p.head_dim <= kMaxVecs * Vectorized<acc>::size(), "head_dim ", p.head_dim,
                        " is larger than this kernel supports (", kMaxVecs * Vectorized<acc>::size(), ")");
      const int64_t num_threads = at::get_num_threads();
      const auto run = item_runner<scalar_t>(p.head_dim);
      Plan plan = plan_items(p, native, num_threads);
      // Every element a combine reads is written by its item first: no zeroing, and the buffer is kept for the
      // calling thread's next call (a fresh one per call was a serial malloc + memset of up to ~0.6 MB in every
      // layer while the other threads waited: ~1.3 ms of a batch-6 fp32 step). Grown with NaN, so that a read of
      // an element nothing wrote would show in the tests' outputs.
      static thread_local std::vector<acc> partial_buffer;
      if (static_cast<int64_t>(partial_buffer.size()) < plan.partial_numel) {
        partial_buffer.resize(plan.partial_numel, std::numeric_limits<acc>::quiet_NaN());
      }
      acc* partials = partial_buffer.data();
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const scalar_t* kp = p.k8 ? nullptr : k_cache.data_ptr<scalar_t>();  // int8: p.k8, p.v8
      const scalar_t* vp = p.v8 ? nullptr : v_cache.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
        Scratch<scalar_t> scratch;
#ifdef PENSIEVE_AMX
        if (p.amx_scores) amx_scores_config();
#endif
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t i : plan.buckets[t]) {
            run(p, plan.items[i], qp, q.stride(0), q.stride(1), kp, vp, op, partials, scratch);
          }
        }
#ifdef PENSIEVE_AMX
        if (p.amx_scores) release_tiles();
#endif
      });
      for (auto [first, count] : plan.groups) combine<scalar_t>(p, plan.items[first], count, partials, op);
    });
  }
  for (int64_t b : by_sdpa) attend_by_sdpa(p, b, q, k_cache, v_cache, out);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                           double scale, std::optional<int64_t> sliding_window, std::optional<double> softcap) {
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  paged_attention_out(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap, out);
  return out;
}

void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                    "k_cache and v_cache must both be [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  TORCH_CHECK_VALUE(k.dim() == 3 && v.sizes() == k.sizes(), "k and v must both be [T, Hkv, D]");
  const bool quantized = k_cache.scalar_type() == at::kChar;  // int8 rows + scale, minimum (pensieve/ops/quant.py)
  const int64_t cache_dim = k_cache.size(3) - (quantized ? kParamBytes : 0);
  TORCH_CHECK_VALUE(k.size(1) == k_cache.size(2) && k.size(2) == cache_dim, "k is [T, ", k.size(1), ", ", k.size(2),
                    "] but the cache holds [.., ", k_cache.size(2), ", ", cache_dim, "]");
  const auto want = quantized ? at::kFloat : k_cache.scalar_type();
  TORCH_CHECK_VALUE(k.scalar_type() == want && v.scalar_type() == want && v_cache.scalar_type() == k_cache.scalar_type(),
                    "k/v dtypes ", k.scalar_type(), "/", v.scalar_type(), " != ", want,
                    quantized ? " (an int8 cache takes float32 k, v)" : " (the cache dtype)");
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                        slot_mapping.scalar_type() == at::kLong,
                    "slot_mapping must be int64 [T=", k.size(0), "]");
  for (const at::Tensor* t : {&k, &v, &k_cache, &v_cache, &slot_mapping}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "all tensors must be on the CPU, got ", t->device());
  }
  const at::Tensor slots_t = slot_mapping.contiguous();
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  const int64_t num_tokens = k.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  std::vector<bool> seen(num_slots, false);
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK_VALUE(slots[t] >= -1 && slots[t] < num_slots, "slot ", slots[t], " out of range [-1, ", num_slots,
                      ") in slot_mapping");
    if (slots[t] < 0) continue;
    TORCH_CHECK_VALUE(!seen[slots[t]], "slot_mapping writes the same slot twice");
    seen[slots[t]] = true;
  }
  const int64_t heads = k.size(1), D = k.size(2), item = k.element_size();
  if (quantized) {  // each (token, head) row: scale = hi / 255 - lo / 255, q = round_half_even((x - lo) / scale) - 128
    for (const auto& [src_t, dst] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
      const at::Tensor src = src_t->stride(2) == 1 ? *src_t : src_t->contiguous();
      const float* sp = src.data_ptr<float>();
      int8_t* dp = dst->data_ptr<int8_t>();
      const int64_t s0 = src.stride(0), s1 = src.stride(1);
      at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (slots[t] < 0) continue;
          for (int64_t h = 0; h < heads; ++h) {
            const float* x = sp + t * s0 + h * s1;
            int8_t* row = dp + (slots[t] * heads + h) * (D + kParamBytes);
            float lo = std::numeric_limits<float>::infinity(), hi = -lo;
            bool finite = true;
            for (int64_t d = 0; d < D; ++d) {
              finite = finite && std::isfinite(x[d]);
              lo = std::min(lo, x[d]);
              hi = std::max(hi, x[d]);
            }
            // a NaN or inf in the row: values -128, a NaN scale and minimum (it reads back as NaN), as quantize_kv
            const float nan = std::numeric_limits<float>::quiet_NaN();
            const float scale = finite ? hi / 255.f - lo / 255.f : nan;
            lo = finite ? lo : nan;
            for (int64_t d = 0; d < D; ++d) {
              const float y = scale > 0.f ? std::nearbyint((x[d] - lo) / scale) : 0.f;
              row[d] = static_cast<int8_t>(std::clamp(y, 0.f, 255.f) - 128.f);
            }
            std::memcpy(row + D, &scale, sizeof(float));
            std::memcpy(row + D + sizeof(float), &lo, sizeof(float));
          }
        }
      });
    }
    return;
  }
  for (const auto& [src_t, dst] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
    const at::Tensor src = src_t->stride(2) == 1 ? *src_t : src_t->contiguous();
    const char* sp = static_cast<const char*>(src.data_ptr());
    char* dp = static_cast<char*>(dst->data_ptr());
    const int64_t s0 = src.stride(0) * item, s1 = src.stride(1) * item;
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;
        char* row = dp + slots[t] * heads * D * item;
        if (s1 == D * item) {
          std::memcpy(row, sp + t * s0, heads * D * item);
        } else {
          for (int64_t h = 0; h < heads; ++h) std::memcpy(row + h * D * item, sp + t * s0 + h * s1, D * item);
        }
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY(pensieve_cpu, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
      "Tensor seq_lens_k, float scale, int? sliding_window=None, float? softcap=None) -> Tensor");
  m.def(
      "paged_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
      "Tensor seq_lens_k, float scale, int? sliding_window, float? softcap, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pensieve_cpu, CPU, m) {
  m.impl("write_kv", &write_kv);
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_attention_out", &paged_attention_out);
}

}  // namespace pensieve_cpu
