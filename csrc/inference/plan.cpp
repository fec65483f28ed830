// A chain of shvit_cpp ops run in one call from Python (torch.classes.shvit_cpp.Plan; see
// shvit_kernels/plan.py): step i computes x = op_i(x, *args_i). A model's float32 CPU
// inference is such a chain (shvit/layers.py: cpu_plan); run from Python, each step paid for
// its argument parsing and dispatch, which at batch 1 added up to more than its small layers.
//
// The plan also keeps the tensors it was made from (parameters and buffers) with their storage
// addresses and version counters: changed() says whether one was moved or modified in place
// since, in a loop of C++ reads instead of two Python attribute reads per tensor.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace shvit_cpu {

namespace {

// -1 for an inference tensor (no version counter; it cannot change outside inference mode).
int64_t version_of(const Tensor& t) {
  return t.is_inference() ? -1 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

struct Plan : torch::CustomClassHolder {
  struct Step {
    c10::OperatorHandle op;
    std::vector<c10::IValue> args;  // the op's arguments after x
  };
  std::vector<Step> steps;
  std::vector<Tensor> watched;
  std::vector<std::pair<const void*, int64_t>> key;

  // Appends shvit_cpp::<name>(x, *args); the op must return one tensor.
  void add(const std::string& name, std::vector<c10::IValue> args) {
    const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(("shvit_cpp::" + name).c_str(), "");
    const c10::FunctionSchema& schema = op.schema();
    TORCH_CHECK(schema.arguments().size() == args.size() + 1, "Plan.add: shvit_cpp::", name, " takes ",
                schema.arguments().size() - 1, " arguments after x, got ", args.size());
    TORCH_CHECK(schema.returns().size() == 1 && schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                "Plan.add: shvit_cpp::", name, " does not return one tensor");
    steps.push_back({op, std::move(args)});
  }

  int64_t size() const { return static_cast<int64_t>(steps.size()); }

  // x after steps [0, end) (all of them for end < 0).
  Tensor run(Tensor x, int64_t end) const {
    const size_t n = end < 0 ? steps.size() : std::min(steps.size(), static_cast<size_t>(end));
    std::vector<c10::IValue> stack;
    for (size_t i = 0; i < n; ++i) {
      const Step& s = steps[i];
      stack.clear();
      stack.reserve(s.args.size() + 1);
      stack.emplace_back(std::move(x));
      stack.insert(stack.end(), s.args.begin(), s.args.end());
      s.op.callBoxed(&stack);
      x = std::move(stack[0]).toTensor();
    }
    return x;
  }

  void watch(std::vector<Tensor> tensors) {
    watched = std::move(tensors);
    key.clear();
    for (const Tensor& t : watched) key.emplace_back(t.const_data_ptr(), version_of(t));
  }

  bool changed() const {
    for (size_t i = 0; i < watched.size(); ++i) {
      const Tensor& t = watched[i];
      if (t.const_data_ptr() != key[i].first || version_of(t) != key[i].second) return true;
    }
    return false;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(shvit_cpp, m) {
  m.class_<Plan>("Plan")
      .def(torch::init<>())
      .def("add", &Plan::add)
      .def("size", &Plan::size)
      .def("run", &Plan::run)
      .def("watch", &Plan::watch)
      .def("changed", &Plan::changed);
}

}  // namespace shvit_cpu
