// Hand-written autograd nodes, as torch's generated ones are: cheaper on the host than a
// torch::autograd::Function, which keeps its saved values in a string-keyed map, wraps every
// output and locks per call. Used by the ops whose host time matters at small sizes
// (dropout_autograd.cpp, batch_norm_autograd.cpp).
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/version.h>

// Compiled autograd (torch._dynamo.config.compiled_autograd) can trace a hand-written node
// through its functional interface (PyCompilerInterface::bind_function with custom and
// traceable functions), which torch has had since 2.7. Older releases build the nodes without
// it: their compiled autograd says "compiled_args not implemented" for fastreg's nodes, and
// eager autograd is unchanged.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define FASTREG_COMPILED_AUTOGRAD 1
#include <torch/csrc/dynamo/compiled_autograd.h>
#else
#define FASTREG_COMPILED_AUTOGRAD 0
#endif

#include <cctype>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

#if FASTREG_COMPILED_AUTOGRAD
// A node's backward as a plain function of its incoming gradients and its saved state.
using FunctionalBackward = torch::autograd::variable_list (*)(const torch::autograd::variable_list& grads,
                                                              const std::vector<c10::IValue>& state);

// Compiled autograd (torch._dynamo.config.compiled_autograd) traces a backward graph with
// placeholder tensors that carry no shapes, so a node cannot run its own code there: it records
// one call of `backward(grads, state)` in the graph, as torch's generated nodes do. Dynamo then
// runs that call on fake tensors (is_traceable), which traces the fastreg ops it dispatches.
// `state` holds the saved tensors already swapped for the trace's (SwapSavedVariables::before).
inline torch::autograd::variable_list record_functional_backward(const torch::autograd::Node& node,
                                                                 torch::dynamo::autograd::SwapSavedVariables& saved,
                                                                 FunctionalBackward backward,
                                                                 const torch::autograd::variable_list& grads,
                                                                 const std::vector<c10::IValue>& state) {
  namespace ca = torch::dynamo::autograd;
  std::vector<at::TypePtr> schema;
  schema.reserve(state.size());
  for (const c10::IValue& value : state) {
    schema.emplace_back(value.isTensor() ? at::TensorType::get() : value.type());
  }
  std::string fn_name = node.name();  // a Python attribute name in the graph's code: "fastreg_DropoutBackward"
  for (char& c : fn_name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  const auto& compiler = ca::getPyCompilerInterface();
  // As a custom function: bound under a fresh name at each capture (a cache miss), and its CPU
  // scalars are never moved to the GPU behind its back.
  const std::string bound = compiler->bind_function(saved.get_py_compiler(), fn_name, backward, schema,
                                                    /*is_custom_function=*/true, /*is_traceable=*/true);
  const c10::IValue output_metadata =
      ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          ca::get_input_metadata(node.next_edges()));
  return compiler->call_function(saved.get_py_compiler(), "apply_functional", bound, grads, state, output_metadata);
}

#endif  // FASTREG_COMPILED_AUTOGRAD

}  // namespace fastreg
