// Typed handles of fastreg's own ops, for C++ that calls them through the dispatcher (the
// autograd files: csrc/*/*_autograd.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastreg {

// The schemas are defined from Python before the compiled library is loaded, so the lookup
// succeeds; callers keep the result in a function-local static (one lookup per process).
template <typename Sig>
c10::TypedOperatorHandle<Sig> fastreg_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
}

}  // namespace fastreg
