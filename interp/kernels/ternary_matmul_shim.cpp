// Runs the Metal body of ternary_matmul.metal on the CPU over its whole grid
// (32 lanes x ceil(N / ROWS) row blocks x M tokens), for verification without a Mac.
// Build: g++ -std=c++20 -O1 -fno-strict-aliasing -shared -fPIC -pthread [-DSHIM_T=half] ternary_matmul_shim.cpp -o libshim.so
#include "metal_shim.h"
#include "ternary_matmul_header.metal"

// The kernel's activation and output type (a template parameter on Metal): float, or
// -DSHIM_T=half / -DSHIM_T=bfloat16_t for the other loaders.
#ifndef SHIM_T
#define SHIM_T float
#endif
typedef SHIM_T T;

// x [M, K] of T (K a multiple of 32), codes uint32 [N, K / 16], scale float [N] or [1],
// dims {K, N, scale stride}; row_blocks = ceil(N / ROWS) as the caller launches it.
extern "C" void ternary_matmul_grid(const T* x, const uint32_t* codes, const float* scale, const uint32_t* dims,
                                    T* out, uint32_t M, uint32_t row_blocks) {
  metal_shim::run_simdgroup_lanes([&](uint lane_index) {
    for (uint gz = 0; gz < M; ++gz) {
      for (uint gy = 0; gy < row_blocks; ++gy) {
        const uint3 thread_position_in_grid = {lane_index, gy, gz};
#include "ternary_matmul.metal"
      }
    }
  });
}
