// How big the CPU's last-level cache is, for the kernels that choose between ordinary and
// non-temporal (cache-bypassing) stores.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

namespace fastreg {

// Bytes of the largest cache that cpu0 sees: FASTREG_CPU_CACHE_MB when set (0 makes every
// float output stream; tests use that), else Linux's sysfs, else 32 MiB. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): on the 2-core EPYC VM glibc reports 320 MiB, ten times the
// 32 MiB L3 that the guest has.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("FASTREG_CPU_CACHE_MB"); env != nullptr && *env != '\0') {
      return std::max<int64_t>(0, std::atoll(env)) << 20;
    }
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
      int64_t size = 0;
      std::string unit;
      if (!(file >> size)) break;
      file >> unit;
      const int64_t scale = unit.rfind("M", 0) == 0 ? (int64_t{1} << 20) : unit.rfind("K", 0) == 0 ? 1024 : 1;
      largest = std::max(largest, size * scale);
    }
    return largest > 0 ? largest : int64_t{32} << 20;
  }();
  return bytes;
}

// Whether a pass whose inputs and outputs take `bytes_touched` together should write its output
// with non-temporal stores: when they exceed half the cache. Below that, the output is still in
// cache for whoever reads it next (the next layer, the backward, the next call); above it,
// ordinary stores evict the inputs that the pass or its neighbours read again (AMD's L3 holds
// what L2 evicts, and other cores share it). Measured on the 2-core EPYC (32 MiB L3), fp32 batch
// norm: at 6.4 MB tensors, eval 250 -> 90 us and training forward 350 -> 210 us without
// streaming; at 12.8 MB, training forward 1.7 ms without streaming, 0.9 ms with it.
inline bool bypass_cache_for(int64_t bytes_touched) { return 2 * bytes_touched > last_level_cache_bytes(); }

}  // namespace fastreg
