// CPU batch norm: the walks' block functions compiled once per ISA (AVX-512, AVX2+F16C,
// baseline) into `flatten` entry points, and the choice among them at run time (cpu_isa.h).
// Private to batch_norm_cpu.cpp, its only includer: internal linkage on purpose, so that
// the per-ISA clones of everything here stay inside that one translation unit.
#pragma once

#include "../common/compute_type.h"
#include "../common/cpu_isa.h"
#include "batch_norm_cpu_order_walk.h"
#include "batch_norm_cpu_row_walk.h"

namespace fastreg {
namespace {

// ---- entry points per ISA: everything above inlined (flatten) and compiled for that ISA.

template <typename T>
struct Kernels {
  using A = typename ComputeType<T>::type;
  void (*order_stats_item)(const OrderWalk&, const void*, int64_t, double*, double*, void*);
  void (*order_reduce_item)(const OrderWalk&, const void*, const void*, int64_t, const A*, double*, double*, void*);
  void (*row_stats_group)(const RowWalk&, const void*, int64_t, double*, double*, void*);
  void (*row_reduce_group)(const RowWalk&, const void*, const void*, int64_t, const double*, double*, double*, void*);
  void (*row_elemt)(const RowWalk&, const void*, void*, int64_t, int64_t, const RowArrays<A>&, bool);
  void (*row_backward)(const RowWalk&, const void*, const void*, void*, int64_t, int64_t, const RowArrays<A>&, bool,
                       bool);
  void (*elemt_in_order)(const BatchNormLayout&, const void*, void*, int64_t, int64_t, const A*, const A*, const A*,
                         bool);
  void (*backward_in_order)(const BatchNormLayout&, const void*, const void*, void*, int64_t, int64_t,
                            const BackwardCoefs<A>*, bool, bool);
};

#define FASTREG_BN_ENTRIES(NS, ISA, ATTRS)                                                                          \
  namespace NS {                                                                                                  \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void order_stats_item(const OrderWalk& w, const void* x, int64_t i, double* mean, double* m2,             \
                              void* scratch) {                                                                    \
    fastreg::order_stats_item<Io<ISA, T>>(w, x, i, mean, m2, scratch);                                            \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void order_reduce_item(const OrderWalk& w, const void* dy, const void* x, int64_t i, const A* mean,       \
                               double* sdy, double* sdyx, void* scratch) {                                        \
    fastreg::order_reduce_item<Io<ISA, T>>(w, dy, x, i, mean, sdy, sdyx, scratch);                                \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_stats_group(const RowWalk& w, const void* x, int64_t g, double* gmean, double* gm2,              \
                             void* scratch) {                                                                     \
    fastreg::row_stats_group<Io<ISA, T>>(w, x, g, gmean, gm2, scratch);                                           \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_reduce_group(const RowWalk& w, const void* dy, const void* x, int64_t g, const double* mean,      \
                              double* gdy, double* gdyx, void* scratch) {                                         \
    fastreg::row_reduce_group<Io<ISA, T>>(w, dy, x, g, mean, gdy, gdyx, scratch);                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_elemt(const RowWalk& w, const void* x, void* y, int64_t f0, int64_t f1, const RowArrays<A>& arr,  \
                       bool stream) {                                                                             \
    fastreg::row_elemt<Io<ISA, T>>(w, x, y, f0, f1, arr, stream);                                                 \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void row_backward(const RowWalk& w, const void* dy, const void* x, void* dx, int64_t f0, int64_t f1,      \
                          const RowArrays<A>& arr, bool training, bool stream) {                                  \
    fastreg::row_backward<Io<ISA, T>>(w, dy, x, dx, f0, f1, arr, training, stream);                               \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void elemt_in_order(const BatchNormLayout& l, const void* x, void* y, int64_t f0, int64_t f1,             \
                            const A* mean, const A* a, const A* b, bool stream) {                                 \
    fastreg::elemt_in_order<Io<ISA, T>>(l, x, y, f0, f1, mean, a, b, stream);                                     \
  }                                                                                                               \
  template <typename T, typename A = typename ComputeType<T>::type>                                               \
  ATTRS void backward_in_order(const BatchNormLayout& l, const void* dy, const void* x, void* dx, int64_t f0,      \
                               int64_t f1, const BackwardCoefs<A>* coefs, bool training, bool stream) {           \
    fastreg::backward_in_order<Io<ISA, T>>(l, dy, x, dx, f0, f1, coefs, training, stream);                        \
  }                                                                                                               \
  template <typename T>                                                                                           \
  Kernels<T> kernels() {                                                                                          \
    return Kernels<T>{&order_stats_item<T>, &order_reduce_item<T>, &row_stats_group<T>, &row_reduce_group<T>,     \
                      &row_elemt<T>,        &row_backward<T>,      &elemt_in_order<T>,  &backward_in_order<T>};   \
  }                                                                                                               \
  }

FASTREG_BN_ENTRIES(isa_base, IsaBase, __attribute__((flatten)))
#if defined(FASTREG_BN_X86)
FASTREG_BN_ENTRIES(isa_avx2, IsaAvx2, __attribute__((target("arch=x86-64-v3"), flatten)))
FASTREG_BN_ENTRIES(isa_avx512, IsaAvx512, __attribute__((target("arch=x86-64-v4"), flatten)))
// Instantiated for bfloat16 only (kernels() below asks for nothing else).
FASTREG_BN_ENTRIES(isa_avx512bf16, IsaAvx512Bf16, __attribute__((target("arch=x86-64-v4,avx512bf16"), flatten)))
#endif

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> chosen = [] {
#if defined(FASTREG_BN_X86)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (cpu_has_avx512_bf16()) return isa_avx512bf16::kernels<T>();
    }
    if (cpu_isa() == CpuIsa::Avx512) return isa_avx512::kernels<T>();
    if (cpu_isa() == CpuIsa::Avx2) return isa_avx2::kernels<T>();
#endif
    return isa_base::kernels<T>();
  }();
  return chosen;
}

}  // namespace
}  // namespace fastreg
