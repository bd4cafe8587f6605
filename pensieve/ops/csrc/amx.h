// AMX tiles (Sapphire Rapids and later), shared by the CPU kernels: the tile configuration and the per-process
// permission. Compiled in where the build's flags include AMX (cpu_kernel.py takes inductor's choice of ISA for this
// CPU); used only where at::cpu::init_amx() says the OS lets this process use them.
#pragma once

#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define PENSIEVE_AMX 1
#endif

namespace pensieve_cpu {

// Whether this process may use AMX tiles (Linux grants them per process; at::cpu::init_amx asks once).
// PENSIEVE_CPU_AMX=0 turns pensieve's own AMX kernels off (oneDNN's, which ATen calls, are not affected).
inline bool amx_ready() {
#ifdef PENSIEVE_AMX
  static const bool ready = [] {
    const char* env = std::getenv("PENSIEVE_CPU_AMX");
    return !(env != nullptr && std::string(env) == "0") && at::cpu::init_amx();
  }();
  return ready;
#else
  return false;
#endif
}

#ifdef PENSIEVE_AMX
// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
  void set(int tile, int num_rows, int bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(num_rows);
    colsb[tile] = static_cast<uint16_t>(num_rows > 0 ? bytes_per_row : 0);
  }
};

// Releases the tiles, and tells ATen's brgemm that its tile configuration is gone (it remembers which one it loaded
// last on this thread and would otherwise run with ours).
inline void release_tiles() { at::native::cpublas::brgemm_release(true); }
#endif

}  // namespace pensieve_cpu
