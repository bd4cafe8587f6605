// Shared by the CPU kernels: reduce W vectors of dot-product partial sums at once.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace pensieve_cpu {

using at::vec::Vectorized;

// Lane t of the result = the sum of the lanes of a[t] (W dot products reduced together: ~3 ops per product
// instead of a full horizontal reduction each).
template <typename T>
inline Vectorized<T> reduce_lanes(const Vectorized<T>* a) {
  using Vec = Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
      const __m512 x = a[2 * i], y = a[2 * i + 1];
      b[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of a[4i .. 4i+3]
      c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    }
    const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    __m256 b[4], c[2];
    for (int i = 0; i < 4; ++i) {
      const __m256 x = a[2 * i], y = a[2 * i + 1];
      b[i] = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
    }
    for (int i = 0; i < 2; ++i) {
      c[i] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                           _mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    }
    return Vec(_mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31)));
  }
#endif
  alignas(64) T out[Vec::size()];
  for (int64_t t = 0; t < Vec::size(); ++t) {
    out[t] = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, a[t]);
  }
  return Vec::loadu(out);
}

}  // namespace pensieve_cpu
