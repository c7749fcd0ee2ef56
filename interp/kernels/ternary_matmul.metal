// Ternary matmul body for mx.fast.metal_kernel (MLX writes the signature around it; the
// helpers come from ternary_matmul_header.metal, passed as the kernel's header).
//
// out[m, n] = scale[n * dims[2]] * sum_k x[m, k] * t[n, k], the trits t unpacked in
// registers from MLX's 2-bit layout; the float weights never exist in memory.
//
// Inputs:  x [M, K] (T: float, half or bfloat16_t), K a multiple of 32 (the caller pads x
//          with zeros, so x always has 32 or more elements and MLX passes it as `device`);
//          codes uint32 [N, K / 16]: code t + 1 of trit 16w + i at bits 2i..2i+1 of word w
//          (padding trits are 0); scale float [N] or [1]; dims uint32 {K, N, scale stride}.
//          codes, scale and dims may have fewer than 8 elements, and MLX then passes them
//          in the `constant` address space: the body only indexes them, never names their
//          address space.
// Output:  out [M, N] of type T.
// Grid (32, ceil(N / ROWS), M), threadgroup (32, 2, 1): each simdgroup computes ROWS
// outputs of one token. Lane l takes words l, l + 32, ... of the rows: per word it loads
// 16 activations with vector loads once and reads one uint32 of codes per row. The sum
// runs as sum(x * code) - sum(x) (the -1 of every trit shared by the ROWS rows), with x
// pre-scaled by 4^-i so a code is masked in place, never shifted (as MLX's qmv does).
//
// The same text is compiled as C++ by tests/interp/test_ternary_metal_shim.py through
// interp/kernels/metal_shim.h: keep to the subset both languages share.
constexpr uint ROWS = 4;
const uint lane = thread_position_in_grid.x;
const uint first_row = thread_position_in_grid.y * ROWS;
const uint m = thread_position_in_grid.z;
const uint K = dims[0];
const uint N = dims[1];
const uint scale_stride = dims[2];
const uint words = K / 16;

const device T* xrow = x + (size_t)m * K;
size_t row_start[ROWS];  // rows past N read the last row again; their results are dropped
for (uint r = 0; r < ROWS; ++r) {
  row_start[r] = (size_t)min(first_row + r, N - 1) * words;
}

float acc[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
float xsum = 0.0f;
for (uint w = lane; w < words; w += 32) {
  float xs[16];
  xsum += load_scaled_activations(xrow + w * 16, xs);
  for (uint r = 0; r < ROWS; ++r) {
    acc[r] += dot_codes(codes[row_start[r] + w], xs);
  }
}
xsum = simd_sum(xsum);
for (uint r = 0; r < ROWS; ++r) {
  const float total = simd_sum(acc[r]) - xsum;
  const uint n = first_row + r;
  if (lane == 0 && n < N) {
    out[(size_t)m * N + n] = (T)(total * (float)scale[n * scale_stride]);
  }
}
