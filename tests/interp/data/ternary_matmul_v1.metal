// Ternary matmul body for mx.fast.metal_kernel (MLX writes the signature around it).
//
// out[m, n] = scale[n * dims[3]] * sum_k x[m, k] * t[n, k], t unpacked in registers
// from 2-bit codes (t + 1 at bits 2i..2i+1 of byte j for trit 4j + i); the float
// weights never exist in memory.
//
// Inputs:  x [M, K] (any float type), packed uint8 [N, ceil(K / 4)],
//          scale float [N] or [1], dims uint32 {K, N, bytes per row, scale stride (1 or 0)}.
// Output:  out [M, N] of template type T.
// Grid (32, N, M), threadgroup (32, 1, 1): one simdgroup per output element; lane l
// reads bytes l, l + 32, ... of the row, then simd_sum adds the 32 partial sums.
//
// The same text is compiled as C++ by tests/interp/test_ternary_metal_shim.py through
// interp/kernels/metal_shim.h: keep to the subset both languages share.
const uint lane = thread_position_in_grid.x;
const uint n = thread_position_in_grid.y;
const uint m = thread_position_in_grid.z;
const uint K = dims[0];
const uint N = dims[1];
const uint row_bytes = dims[2];
const uint scale_stride = dims[3];

const device uint8_t* wrow = packed + (size_t)n * row_bytes;
const device auto* xrow = x + (size_t)m * K;

float acc = 0.0f;
for (uint b = lane; b < row_bytes; b += 32) {
  const uint byte = wrow[b];
  const uint k0 = b * 4;
  for (uint i = 0; i < 4; ++i) {
    const uint k = k0 + i;
    if (k < K) {
      const uint code = (byte >> (2 * i)) & 3u;
      const float xv = (float)xrow[k];
      acc += code == 2u ? xv : (code == 0u ? -xv : 0.0f);
    }
  }
}
const float total = simd_sum(acc);
if (lane == 0) {
  out[(size_t)m * N + n] = (T)(total * (float)scale[n * scale_stride]);
}
