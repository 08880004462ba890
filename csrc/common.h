// Shared declarations of the aimkp._C extension (no libtorch: raw pointers, sizes, dtype codes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace aimkp {

// dtype codes, mirrored by aimkp/_ext.py DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline std::size_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// ---- scalar conversions (host), round-to-nearest-even, NaN/Inf preserved -----------------------
// Bit casts (std::bit_cast is C++20; memcpy is the C++17 way without undefined behaviour).
inline float float_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t bits_of_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return float_of_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = bits_of_float(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half -> normal float
      int e = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  return float_of_bits(bits);
}

// F. Giesen's float_to_half_fast3_rtne (public domain); exact round-to-nearest-even.
inline uint16_t float_to_half(float ff) {
  uint32_t f = bits_of_float(ff);
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16max) {
    o = (f > f32infty) ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {
    float fv = float_of_bits(f) + float_of_bits(denorm_magic_u);
    o = static_cast<uint16_t>(bits_of_float(fv) - denorm_magic_u);
  } else {
    uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = static_cast<uint16_t>(f >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// ---- CPU kernels (masked_embedding.cpp) ---------------------------------------------------------
// `threads` <= 0: OpenMP's default; the Python side passes torch.get_num_threads(). Work below
// kParallelBytes runs on the calling thread: a fork-join costs more than it saves there, and far
// more on an oversubscribed machine where a woken worker may wait a whole scheduler quantum.
constexpr std::size_t kParallelBytes = std::size_t(1) << 20;

// src[k] selects the source of output row k: [0, V) a table row, [V, V+M) image row src-V,
// anything else the fill row (zeros when fill == 0). Never reads outside the given buffers.
void masked_embedding_forward_cpu(uintptr_t out, uintptr_t src, int64_t K, int64_t D,
                                  uintptr_t weight, int64_t V, int64_t weight_stride,
                                  uintptr_t image, int64_t M, int64_t image_stride, uintptr_t fill,
                                  int dtype, int threads);

// grad [K, D] (dtype, contiguous); sorted_src / perm from a stable sort of src.
// grad_weight [V, D] (dtype) and grad_image [M, D] (dtype) are fully written (untouched rows get 0);
// grad_fill [D] is float32. A zero pointer skips that output. Deterministic, atomic-free.
void masked_embedding_backward_cpu(uintptr_t grad, int64_t K, int64_t D, uintptr_t sorted_src,
                                   uintptr_t perm, uintptr_t grad_weight, int64_t V,
                                   uintptr_t grad_image, int64_t M, uintptr_t grad_fill, int dtype,
                                   int threads);

int max_threads();

#ifdef AIMKP_WITH_CUDA
// ---- CUDA launchers (masked_embedding_cuda.cu); stream is a cudaStream_t as an integer -------
void masked_embedding_forward_cuda(uintptr_t out, uintptr_t src, int64_t K, int64_t D,
                                   uintptr_t weight, int64_t V, int64_t weight_stride,
                                   uintptr_t image, int64_t M, int64_t image_stride,
                                   uintptr_t fill, int dtype, uintptr_t stream);

// Fast mode: fp32 atomics into grad_weight32 [V, D] and grad_fill32 [D] (both zeroed by the
// caller); grad_image [M, D] (dtype, zeroed by the caller) written directly (rows are unique).
void masked_embedding_backward_atomic_cuda(uintptr_t grad, uintptr_t src, int64_t K, int64_t D,
                                           uintptr_t grad_weight32, int64_t V,
                                           uintptr_t grad_image, int64_t M, uintptr_t grad_fill32,
                                           int dtype, uintptr_t stream);

// Deterministic mode: one block per segment of equal sorted ids (seg_start [S+1]); grad_weight
// and grad_image (dtype) zeroed by the caller, grad_fill32 [D] float32 written.
void masked_embedding_backward_segments_cuda(uintptr_t grad, uintptr_t sorted_src, uintptr_t perm,
                                             uintptr_t seg_start, int64_t S, int64_t D,
                                             uintptr_t grad_weight, int64_t V,
                                             uintptr_t grad_image, int64_t M,
                                             uintptr_t grad_fill32, int dtype, uintptr_t stream);
#endif

}  // namespace aimkp
