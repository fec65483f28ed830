// A chain of shvit_cpp ops run in one call from Python (torch.classes.shvit_cpp.Plan; see
// shvit_kernels/plan.py): step i computes x = op_i(x, *args_i). A model's float32 CPU
// inference is such a chain (shvit/layers.py: cpu_plan); run from Python, each step paid for
// its argument parsing and dispatch, which at batch 1 added up to more than its small layers.
//
// The first steps may run on the batch in chunks of images (chunk_prefix): SHViT's stem
// convolutions make the network's largest activations (at batch 16 and 224 px, S1's first conv
// writes 12.8 MB), which past the caches cost their kernels a fifth of their time; run a few
// images at a time, each conv reads its input from cache, as at batch 1.
//
// With several intra-op threads and at least one image per thread, the batch is split among
// the threads and each runs the whole chain on its images, one thread per op (see run()):
// between steps no thread waits for the others, and no activation written on one core is read
// on another. Splitting every op's rows among the threads instead, on a 2-core VM, S1 at batch
// 16 ran 4-5% slower, and up to 27% slower in phases where the two vCPUs exchanged data slowly.
//
// The plan also keeps the tensors it was made from (parameters and buffers) with their storage
// addresses and version counters: run() sees whether one was moved or modified in place since,
// in a loop of C++ reads instead of two Python attribute reads per tensor.
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
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
  int64_t prefix = 0;             // steps run in chunks of images
  double prefix_bytes = 0;        // their largest input + output, bytes per pixel of the input x
  int64_t prefix_budget = 0;      // bytes of that per chunk and thread

  // Steps [0, steps) run on chunks of the batch: as many images as keep bytes_per_pixel * H * W
  // per image within budget bytes per intra-op thread (at least one image). Their results are
  // concatenated along the batch: each step must compute every image on its own, as every
  // shvit_cpp op does.
  void chunk_prefix(int64_t steps, double bytes_per_pixel, int64_t budget) {
    TORCH_CHECK(steps >= 0 && bytes_per_pixel >= 0 && budget >= 0, "Plan.chunk_prefix: negative argument");
    prefix = steps;
    prefix_bytes = bytes_per_pixel;
    prefix_budget = budget;
  }

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

  // x after steps [0, end) (all of them for end < 0), or None where a watched tensor was moved or
  // modified in place since watch(): a stale plan does not run, and the caller learns it from the
  // call it makes anyway (a separate changed() call cost 30 us at batch 1, its first touch of the
  // binding code coming after a forward has streamed the weights through the caches).
  c10::optional<Tensor> run(Tensor x, int64_t end) const {
    if (changed()) return c10::nullopt;
    const size_t n = end < 0 ? steps.size() : std::min(steps.size(), static_cast<size_t>(end));
    const int64_t threads = at::get_num_threads();
    const int64_t per = x.dim() == 4 ? x.size(0) / threads : 0, rest = x.dim() == 4 ? x.size(0) % threads : 0;
    // a remainder costs a pass of its own over the weights: worth it from two images per thread
    if (threads == 1 || per == 0 || (rest > 0 && per < 2) || at::in_parallel_region()) {
      return run_images(std::move(x), n, threads);
    }
    // Each thread runs every step on its own `per` images (the remainder runs after, on all
    // threads): no thread waits for another between steps, and each reads only the activations
    // it wrote itself, from its own core's caches.
    std::vector<Tensor> parts(static_cast<size_t>(threads + (rest > 0)));
    const at::ThreadLocalState state;  // grad and inference mode, dispatch keys: the caller's
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t t = t0; t < t1; ++t) parts[t] = run_images(x.narrow(0, t * per, per), n, 1);
    });
    if (rest > 0) parts.back() = run_images(x.narrow(0, threads * per, rest), n, threads);
    return at::cat(parts, 0);  // channels_last parts give a channels_last result
  }

  // x after steps [0, n), with the chunked prefix, where `threads` threads run the steps.
  Tensor run_images(Tensor x, size_t n, int64_t threads) const {
    size_t i = 0;
    const size_t p = std::min(n, static_cast<size_t>(prefix));
    if (p > 0 && x.dim() == 4 && x.size(0) > 1) {
      const double image = prefix_bytes * static_cast<double>(x.size(2) * x.size(3));
      const double budget = static_cast<double>(prefix_budget) * threads;
      const int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>(budget / std::max(image, 1.0)));
      if (chunk < x.size(0)) {
        std::vector<Tensor> parts;
        for (int64_t b = 0; b < x.size(0); b += chunk) {
          parts.push_back(run_steps(x.narrow(0, b, std::min(chunk, x.size(0) - b)), 0, p));
        }
        x = at::cat(parts, 0);  // channels_last parts give a channels_last result
        i = p;
      }
    }
    return run_steps(std::move(x), i, n);
  }

  Tensor run_steps(Tensor x, size_t begin, size_t end) const {
    std::vector<c10::IValue> stack;
    for (size_t i = begin; i < end; ++i) {
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
      .def("chunk_prefix", &Plan::chunk_prefix)
      .def("watch", &Plan::watch);
}

}  // namespace shvit_cpu
