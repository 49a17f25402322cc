// What makes the CPU kernels' row loops vectorise.
//
// VLFAST_CLONES: GCC 12+ on glibc builds a function twice, for AVX2 + FMA and for the baseline,
// and picks one at load time (an ifunc): a wheel cannot assume AVX2, and SSE2 alone left the
// row loops of dropout_add_layer_norm about 1.3x slower. The two clones differ in the last bits
// (FMA contracts). flatten inlines the helpers (fp16/bf16 conversions, tiles) into each clone.
// Other compilers build the baseline only, and so does VLFAST_CPU_BASELINE=1 (setup.py, which
// also leaves out dropout_add_layer_norm's AVX2 Philox): CI tests with it the code that an AVX2
// machine never picks.
#pragma once
#include <cstdint>

#if !defined(VLFAST_BASELINE_ONLY) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    defined(__x86_64__) && defined(__GLIBC__)
#define VLFAST_CLONES __attribute__((flatten, target_clones("arch=x86-64-v3", "default")))
#else
#define VLFAST_CLONES
#endif

namespace vlfast {

// A row's sum in kLanes partial sums, which the compiler keeps in vector registers: one running
// sum, even vectorised, makes every add wait for the last (float addition does not reassociate).
template <typename A, typename F>
inline A row_sum(int64_t dim, F term) {
  constexpr int64_t kLanes = 16;
  A lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(d + j);
  }
  A total = 0;
  for (; d < dim; ++d) total += term(d);
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

}  // namespace vlfast
