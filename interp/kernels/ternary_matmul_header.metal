// Helpers of the ternary matmul kernel (ternary_matmul.metal), given to
// mx.fast.metal_kernel as its header: MLX places them before the kernel's signature.

// Loads 16 activations from x (16-element aligned: the caller's rows are multiples of 32)
// four at a time, stores x[i] * 4^-(i % 4) in xs and returns the plain sum of the 16.
// (MLX 0.32's bfloat16_t is Metal 3.1's bfloat, which has vector types like half.)
inline float load_scaled_activations(const device float* x, thread float* xs) {
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    const float4 v = ((const device float4*)x)[i];
    sum += (v[0] + v[1]) + (v[2] + v[3]);
    xs[4 * i] = v[0];
    xs[4 * i + 1] = v[1] * 0.25f;
    xs[4 * i + 2] = v[2] * 0.0625f;
    xs[4 * i + 3] = v[3] * 0.015625f;
  }
  return sum;
}

inline float load_scaled_activations(const device half* x, thread float* xs) {
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    const half4 v = ((const device half4*)x)[i];
    const float a = (float)v[0], b = (float)v[1], c = (float)v[2], d = (float)v[3];
    sum += (a + b) + (c + d);
    xs[4 * i] = a;
    xs[4 * i + 1] = b * 0.25f;
    xs[4 * i + 2] = c * 0.0625f;
    xs[4 * i + 3] = d * 0.015625f;
  }
  return sum;
}

inline float load_scaled_activations(const device bfloat16_t* x, thread float* xs) {
  float sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    const bfloat4 v = ((const device bfloat4*)x)[i];
    const float a = (float)v[0], b = (float)v[1], c = (float)v[2], d = (float)v[3];
    sum += (a + b) + (c + d);
    xs[4 * i] = a;
    xs[4 * i + 1] = b * 0.25f;
    xs[4 * i + 2] = c * 0.0625f;
    xs[4 * i + 3] = d * 0.015625f;
  }
  return sum;
}

// sum over i of x[i] * code_i for the 16 2-bit codes of one word, given xs from
// load_scaled_activations: masking code i in place leaves code_i * 4^(i % 4) (after the
// byte shift), and xs[i] carries the matching 4^-(i % 4), so every product is exact.
inline float dot_codes(uint word, thread const float* xs) {
  float sum = 0.0f;
  for (int b = 0; b < 4; ++b) {
    const uint byte = (word >> (8 * b)) & 0xffu;
    sum += xs[4 * b] * (float)(byte & 0x03u) + xs[4 * b + 1] * (float)(byte & 0x0cu) +
           xs[4 * b + 2] * (float)(byte & 0x30u) + xs[4 * b + 3] * (float)(byte & 0xc0u);
  }
  return sum;
}
