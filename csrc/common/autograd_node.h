// Hand-written autograd nodes, as torch's generated ones are: cheaper on the host than a
// torch::autograd::Function, which keeps its saved values in a string-keyed map, wraps every
// output and locks per call. Used by the ops whose host time matters at small sizes
// (dropout_autograd.cpp).
#pragma once

#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace fastreg {

// torch's nodes are held by std::shared_ptr up to 2.11 (what the GPU machine runs) and by
// c10::intrusive_ptr from later releases (2.13 here): NodePtr is whichever the headers use.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    // torch's deleter frees a long chain of nodes without recursing once per node. Found by
    // argument-dependent lookup, as headers that hold nodes by intrusive_ptr do not declare it.
    return NodePtr(new T(std::forward<Args>(args)...), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

}  // namespace fastreg
