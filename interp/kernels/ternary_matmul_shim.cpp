// Runs the Metal body of ternary_matmul.metal on the CPU over its whole grid
// (32 lanes x N rows x M tokens), for verification without a Mac.
// Build: g++ -std=c++20 -O1 -shared -fPIC -pthread ternary_matmul_shim.cpp -o libshim.so
#include "metal_shim.h"

typedef float T;  // the kernel's output type (a template parameter on Metal)

extern "C" void ternary_matmul_grid(const float* x, const uint8_t* packed, const float* scale, const uint32_t* dims,
                                    float* out, uint32_t M) {
  const uint grid_y = dims[1];
  metal_shim::run_simdgroup_lanes([&](uint lane_index) {
    for (uint gz = 0; gz < M; ++gz) {
      for (uint gy = 0; gy < grid_y; ++gy) {
        const uint3 thread_position_in_grid = {lane_index, gy, gz};
#include "ternary_matmul.metal"
      }
    }
  });
}
