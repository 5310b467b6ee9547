// How big the CPU's last-level cache is, for the kernels that choose between ordinary and
// non-temporal (cache-bypassing) stores.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

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
    // C stdio, not <fstream>: some toolchains link libstdc++ statically into the extension,
    // and that copy's streams crash on the locale that torch's libstdc++ set up (seen on the
    // H100 machine's g++ 13, inside std::istream's number parsing).
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      char path[64];
      std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
      std::FILE* file = std::fopen(path, "r");
      if (file == nullptr) break;
      long long size = 0;
      char unit = '\0';
      const int fields = std::fscanf(file, "%lld%c", &size, &unit);
      std::fclose(file);
      if (fields < 1) break;
      const int64_t scale = unit == 'M' ? (int64_t{1} << 20) : unit == 'K' ? 1024 : 1;
      largest = std::max<int64_t>(largest, size * scale);
    }
    return largest > 0 ? largest : int64_t{32} << 20;
  }();
  return bytes;
}

// How a pass spends its time, which decides how much of the cache its tensors may take before
// its output bypasses it.
enum class CachePass {
  // A few flops per element (batch norm's passes): the time is moving the bytes, so keeping
  // them in cache is the whole gain.
  MemoryBound,
  // Random numbers per element (dropout): measured, streaming already pays from half the cache
  // (below); why it differs from batch norm at the same size is not established.
  ComputeBound,
};

// Whether a pass whose inputs and outputs take `bytes_touched` together should write its output
// with non-temporal stores. Below the limit the output is still in cache for whoever reads it
// next (the next layer, the backward, the next call); above it, ordinary stores evict the inputs
// that the pass or its neighbours read again (AMD's L3 holds what L2 evicts, and other cores
// share it). Measured on the 2-core EPYC (32 MiB L3), processes with and without streaming in
// turns:
//  - MemoryBound, up to the whole cache: fp32 batch norm at 12.8 MB tensors (25.6 MB touched),
//    eval 468-518 -> 235-357 us and training forward 716-934 -> 496-713 us without streaming
//    in 7 pairs of 8 (in the 8th, streaming won: 252 and 487 us); at 6.4 MB tensors, backward
//    (19.2 MB touched) 385-450 -> 269-333 us (5 pairs of 5). At
//    38.4 MB touched (backward at 12.8 MB) the two tie, and larger passes gain from streaming:
//    1.4-2x for the element-wise pass at 25 MB tensors.
//  - ComputeBound, up to half the cache: fp32 dropout at 3M elements (24 MB touched) 551-1016 us
//    without streaming against 498-717 us with it (5 pairs of 5), the opposite of batch norm at
//    the same size.
inline bool bypass_cache_for(int64_t bytes_touched, CachePass pass) {
  const int64_t limit = pass == CachePass::MemoryBound ? last_level_cache_bytes() : last_level_cache_bytes() / 2;
  return bytes_touched > limit;
}

}  // namespace fastreg
