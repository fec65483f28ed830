// The instruction-set level the CPU kernels run at, chosen once at run time.
//
// The extension is compiled for the baseline ISA of its target (x86-64, aarch64). Kernels with
// ISA-specific code are compiled per level with SHVIT_TARGET_AVX2 / SHVIT_TARGET_AVX512
// (function target attributes) and called only when active() is at least that level, so one
// build runs on every CPU of its architecture at that CPU's best level. active() starts at
// best() (what this CPU runs), lowered by the environment variable SHVIT_KERNELS_ISA
// (baseline | avx2 | avx512) read at first use; set_active() changes it (tests, comparisons).
#pragma once

#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define SHVIT_X86 1
#include <immintrin.h>
#define SHVIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SHVIT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
// the AVX-512 level plus AVX512-BF16, which that level does not imply: callers check the CPU
// has it (shvit_gemm::bf16_available)
#define SHVIT_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
// AVX512-BF16 plus the AMX tiles (AMX-TILE, AMX-BF16): callers check the CPU has them and the
// kernel granted their state (shvit_gemm::bf16_kernel)
#define SHVIT_TARGET_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#endif

namespace shvit_isa {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The highest level this CPU runs (kBaseline off x86-64).
Isa best();
// The level in use.
Isa active();
// Switches the level for later kernel calls: must be at most best(), and not while kernels run
// on other threads.
void set_active(Isa level);

const char* name(Isa level);
// The level called `s` ("baseline", "avx2", "avx512"); false for any other name.
bool parse(const std::string& s, Isa* level);

inline bool at_least(Isa level) { return static_cast<int>(active()) >= static_cast<int>(level); }

}  // namespace shvit_isa
