// Lets the body of a Metal kernel (as given to mx.fast.metal_kernel) compile as C++
// (g++ -std=c++20) and run on the CPU over its whole grid:
//  - the thread position is a variable the harness sets for every grid point;
//  - simd_sum is emulated with 32 std::threads (one per lane) meeting at a barrier, and
//    adds the lanes' values in lane order 0..31;
//  - the Metal types the kernels use (half, bfloat16_t, float4, half4, bfloat4) and min() are
//    given C++ stand-ins;
//  - Metal address-space qualifiers (device, threadgroup, constant, thread) are defined
//    away at the end of this header, so include it after every standard header. (The
//    address spaces are checked separately: tests/interp/test_metal_address_spaces.py.)
#pragma once
#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

typedef unsigned int uint;
struct uint3 { uint x, y, z; };
using std::min;

typedef _Float16 half;

// bfloat16 as Metal stores it: the top 16 bits of a float32, rounded to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float value) {
    uint32_t word;
    std::memcpy(&word, &value, sizeof word);
    bits = (uint16_t)((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t word = (uint32_t)bits << 16;
    float value;
    std::memcpy(&value, &word, sizeof value);
    return value;
  }
};

// Metal's vectors as far as the kernels use them: loaded whole, read by index.
template <typename T>
struct vec4 {
  T v[4];
  T operator[](int i) const { return v[i]; }
};
typedef vec4<float> float4;
typedef vec4<half> half4;
typedef vec4<bfloat16_t> bfloat4;

namespace metal_shim {
constexpr int kSimdWidth = 32;
inline float slots[kSimdWidth];
inline std::barrier<>* simd_barrier = nullptr;
inline thread_local uint lane_id = 0;

// Runs lane_body(lane) for lanes 0..31 concurrently (each lane walks the grid in the
// same order, so every simd_sum call is met by all 32 lanes).
inline void run_simdgroup_lanes(const std::function<void(uint)>& lane_body) {
  std::barrier<> barrier(kSimdWidth);
  simd_barrier = &barrier;
  std::vector<std::thread> lanes;
  for (uint l = 0; l < (uint)kSimdWidth; ++l)
    lanes.emplace_back([&lane_body, l] { lane_id = l; lane_body(l); });
  for (auto& t : lanes) t.join();
  simd_barrier = nullptr;
}
}  // namespace metal_shim

// Every lane of the simdgroup must call it (as on the GPU); returns the same sum to all.
inline float simd_sum(float value) {
  metal_shim::slots[metal_shim::lane_id] = value;
  metal_shim::simd_barrier->arrive_and_wait();
  float total = 0.0f;
  for (int i = 0; i < metal_shim::kSimdWidth; ++i) total += metal_shim::slots[i];
  metal_shim::simd_barrier->arrive_and_wait();
  return total;
}

#define device
#define threadgroup
#define constant
#define thread
