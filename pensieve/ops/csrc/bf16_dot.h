// AVX-512 BF16 dot products (vdpbf16ps: Cooper Lake, Sapphire Rapids and later, AMD Zen 4/5), shared by the CPU
// kernels. The kernels that use them are compiled into every x86-64 build through a per-function target attribute
// (PENSIEVE_BF16_DOT_TARGET), whatever ISA flags the build has (inductor's for this CPU leave AVX-512 BF16 out on
// AMD Zen 4), and run only where bf16_dot_ready() says so: where the CPU reports AVX-512 BF16 (cpuid) and
// PENSIEVE_CPU_BF16_DOT is not 0. That switch forces the widening (fp32 FMA) paths, as PENSIEVE_CPU_AMX=0 does AMX,
// so a host with both can test and time each path.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define PENSIEVE_BF16_DOT 1
#define PENSIEVE_BF16_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace pensieve_cpu {

// Whether the CPU has AVX-512 BF16 (cpuid), whatever this process is told to use.
inline bool cpu_has_bf16_dot() {
#ifdef PENSIEVE_BF16_DOT
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0 && __builtin_cpu_supports("avx512bw") != 0;
  }();
  return has;
#else
  return false;
#endif
}

// Whether pensieve's own vdpbf16ps kernels run in this process (read once).
inline bool bf16_dot_ready() {
  static const bool ready = [] {
    const char* env = std::getenv("PENSIEVE_CPU_BF16_DOT");
    return !(env != nullptr && std::string(env) == "0") && cpu_has_bf16_dot();
  }();
  return ready;
}

}  // namespace pensieve_cpu
