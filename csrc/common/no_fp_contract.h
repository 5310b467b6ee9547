// Included before the code it governs, this turns off the contraction of a * b + c into fused
// multiply-adds for the rest of the file. GCC contracts by default, and only where the ISA has
// FMA (the per-ISA clones of the CPU kernels), so results would depend on the machine; the
// kernels, the reference and the device's explicitly rounded intrinsics round every product and sum.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
