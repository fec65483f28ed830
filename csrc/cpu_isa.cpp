// Run-time choice of the instruction-set level (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace shvit_isa {

namespace {
std::atomic<int> g_active{-1};  // -1: not chosen yet

Isa detect() {
#ifdef SHVIT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
#else
  return Isa::kBaseline;
#endif
}
}  // namespace

Isa best() {
  static const Isa level = detect();
  return level;
}

Isa start() {
  static const Isa level = [] {
    const char* env = std::getenv("SHVIT_KERNELS_ISA");
    if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best();
    Isa want;
    TORCH_CHECK(parse(env, &want), "SHVIT_KERNELS_ISA=", env, " is not one of auto, baseline, avx2, avx512");
    TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best()), "SHVIT_KERNELS_ISA=", env,
                ": this CPU runs at most ", name(best()));
    return want;
  }();
  return level;
}

Isa active() {
  const int v = g_active.load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<Isa>(v);
  int expected = -1;
  g_active.compare_exchange_strong(expected, static_cast<int>(start()));
  return static_cast<Isa>(g_active.load(std::memory_order_relaxed));
}

void set_active(Isa level) {
  TORCH_CHECK(static_cast<int>(level) <= static_cast<int>(best()), "this CPU runs at most ", name(best()),
              ", not ", name(level));
  g_active.store(static_cast<int>(level), std::memory_order_relaxed);
}

const char* name(Isa level) {
  switch (level) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

bool parse(const std::string& s, Isa* level) {
  for (Isa l : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (s == name(l)) {
      *level = l;
      return true;
    }
  }
  return false;
}

// The op shvit_cpp::isa: "" reports the level in use; "auto" (the start-up level) or a level's
// name switches to it and reports it.
std::string request(const std::string& level) {
  if (!level.empty()) {
    Isa want = start();
    TORCH_CHECK(level == "auto" || parse(level, &want), "isa: expected '', 'auto', 'baseline', 'avx2' or 'avx512', got '",
                level, "'");
    set_active(want);
  }
  return name(active());
}

}  // namespace shvit_isa
