// CUDA kernels of aimkp.ops.masked_embedding, mirroring the CPU ones (masked_embedding.cpp):
// forward row gather, backward with fp32 atomics (fast) or per-segment sums (deterministic).
// Launchers take raw pointers and the stream as an integer; no libtorch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace aimkp {
namespace {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("aimkp._C ") + what + ": " + cudaGetErrorString(err));
  }
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One block per output row (grid-stride); the row is copied in units of U (16/8/4/2 bytes).
template <typename U>
__global__ void gather_rows_kernel(char* __restrict__ out, const int64_t* __restrict__ src,
                                   int64_t K, int64_t row_units, const char* __restrict__ w,
                                   int64_t V, int64_t w_row_bytes, const char* __restrict__ img,
                                   int64_t M, int64_t img_row_bytes, const char* __restrict__ fill) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t r = src[k];
    const U* from = nullptr;
    if (r >= 0 && r < V) {
      from = reinterpret_cast<const U*>(w + r * w_row_bytes);
    } else if (img != nullptr && r >= V && r < V + M) {
      from = reinterpret_cast<const U*>(img + (r - V) * img_row_bytes);
    } else if (fill != nullptr) {
      from = reinterpret_cast<const U*>(fill);
    }
    U* dst = reinterpret_cast<U*>(out) + k * row_units;
    if (from != nullptr) {
      for (int64_t j = threadIdx.x; j < row_units; j += blockDim.x) dst[j] = from[j];
    } else {
      U zero;
      memset(&zero, 0, sizeof(U));
      for (int64_t j = threadIdx.x; j < row_units; j += blockDim.x) dst[j] = zero;
    }
  }
}

template <typename T>
__global__ void backward_atomic_kernel(const T* __restrict__ grad, const int64_t* __restrict__ src,
                                       int64_t K, int64_t D, float* __restrict__ gw32, int64_t V,
                                       T* __restrict__ gi, int64_t M, float* __restrict__ gf32) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t r = src[k];
    const T* g = grad + k * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const float v = to_f(g[d]);
      if (r >= 0 && r < V) {
        if (gw32 != nullptr) atomicAdd(gw32 + r * D + d, v);
      } else if (r >= V && r < V + M) {
        if (gi != nullptr) gi[(r - V) * D + d] = g[d];  // each image row has one position
      } else if (r < 0) {
        if (gf32 != nullptr) atomicAdd(gf32 + d, v);
      }
    }
  }
}

template <typename T>
__global__ void backward_segments_kernel(const T* __restrict__ grad,
                                         const int64_t* __restrict__ sorted_src,
                                         const int64_t* __restrict__ perm,
                                         const int64_t* __restrict__ seg_start, int64_t S,
                                         int64_t D, T* __restrict__ gw, int64_t V,
                                         T* __restrict__ gi, int64_t M, float* __restrict__ gf32) {
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t a = seg_start[s], b = seg_start[s + 1];
    const int64_t id = sorted_src[a];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t i = a; i < b; ++i) acc += to_f(grad[perm[i] * D + d]);  // fixed order
      if (id >= 0 && id < V) {
        if (gw != nullptr) gw[id * D + d] = from_f<T>(acc);
      } else if (id >= V && id < V + M) {
        if (gi != nullptr) gi[(id - V) * D + d] = from_f<T>(acc);
      } else if (id < 0) {
        if (gf32 != nullptr) gf32[d] = acc;
      }
    }
  }
}

inline int blocks_for(int64_t n) {
  const int64_t cap = 65535;
  return static_cast<int>(n < cap ? (n > 0 ? n : 1) : cap);
}

template <typename U>
void launch_gather(uintptr_t out, uintptr_t src, int64_t K, int64_t row_bytes, uintptr_t weight,
                   int64_t V, int64_t w_row_bytes, uintptr_t image, int64_t M,
                   int64_t img_row_bytes, uintptr_t fill, cudaStream_t stream) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
  const int threads = units >= 256 ? 256 : (units >= 64 ? 64 : 32);
  gather_rows_kernel<U><<<blocks_for(K), threads, 0, stream>>>(
      reinterpret_cast<char*>(out), reinterpret_cast<const int64_t*>(src), K, units,
      reinterpret_cast<const char*>(weight), V, w_row_bytes, reinterpret_cast<const char*>(image),
      M, img_row_bytes, reinterpret_cast<const char*>(fill));
}

}  // namespace

void masked_embedding_forward_cuda(uintptr_t out, uintptr_t src, int64_t K, int64_t D,
                                   uintptr_t weight, int64_t V, int64_t weight_stride,
                                   uintptr_t image, int64_t M, int64_t image_stride,
                                   uintptr_t fill, int dtype, uintptr_t stream) {
  if (K == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t es = static_cast<int64_t>(dtype_size(dtype));
  const int64_t row_bytes = D * es, wrb = weight_stride * es, irb = image_stride * es;
  // Widest copy unit that divides every row length, stride and base address.
  uint64_t all = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(wrb) |
                 static_cast<uint64_t>(irb) | out | weight | (image ? image : 0) |
                 (fill ? fill : 0);
  if (all % 16 == 0) {
    launch_gather<uint4>(out, src, K, row_bytes, weight, V, wrb, image, M, irb, fill, st);
  } else if (all % 8 == 0) {
    launch_gather<uint2>(out, src, K, row_bytes, weight, V, wrb, image, M, irb, fill, st);
  } else if (all % 4 == 0) {
    launch_gather<uint32_t>(out, src, K, row_bytes, weight, V, wrb, image, M, irb, fill, st);
  } else {
    launch_gather<uint16_t>(out, src, K, row_bytes, weight, V, wrb, image, M, irb, fill, st);
  }
  check(cudaGetLastError(), "masked_embedding_forward_cuda");
}

void masked_embedding_backward_atomic_cuda(uintptr_t grad, uintptr_t src, int64_t K, int64_t D,
                                           uintptr_t grad_weight32, int64_t V,
                                           uintptr_t grad_image, int64_t M, uintptr_t grad_fill32,
                                           int dtype, uintptr_t stream) {
  if (K == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int threads = D >= 256 ? 256 : 64;
  auto s = reinterpret_cast<const int64_t*>(src);
  auto gw = reinterpret_cast<float*>(grad_weight32);
  auto gf = reinterpret_cast<float*>(grad_fill32);
  switch (dtype) {
    case kFloat32:
      backward_atomic_kernel<float><<<blocks_for(K), threads, 0, st>>>(
          reinterpret_cast<const float*>(grad), s, K, D, gw, V,
          reinterpret_cast<float*>(grad_image), M, gf);
      break;
    case kFloat16:
      backward_atomic_kernel<__half><<<blocks_for(K), threads, 0, st>>>(
          reinterpret_cast<const __half*>(grad), s, K, D, gw, V,
          reinterpret_cast<__half*>(grad_image), M, gf);
      break;
    default:
      backward_atomic_kernel<__nv_bfloat16><<<blocks_for(K), threads, 0, st>>>(
          reinterpret_cast<const __nv_bfloat16*>(grad), s, K, D, gw, V,
          reinterpret_cast<__nv_bfloat16*>(grad_image), M, gf);
      break;
  }
  check(cudaGetLastError(), "masked_embedding_backward_atomic_cuda");
}

void masked_embedding_backward_segments_cuda(uintptr_t grad, uintptr_t sorted_src, uintptr_t perm,
                                             uintptr_t seg_start, int64_t S, int64_t D,
                                             uintptr_t grad_weight, int64_t V,
                                             uintptr_t grad_image, int64_t M,
                                             uintptr_t grad_fill32, int dtype, uintptr_t stream) {
  if (S == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int threads = D >= 256 ? 256 : 64;
  auto ss = reinterpret_cast<const int64_t*>(sorted_src);
  auto pp = reinterpret_cast<const int64_t*>(perm);
  auto sg = reinterpret_cast<const int64_t*>(seg_start);
  auto gf = reinterpret_cast<float*>(grad_fill32);
  switch (dtype) {
    case kFloat32:
      backward_segments_kernel<float><<<blocks_for(S), threads, 0, st>>>(
          reinterpret_cast<const float*>(grad), ss, pp, sg, S, D,
          reinterpret_cast<float*>(grad_weight), V, reinterpret_cast<float*>(grad_image), M, gf);
      break;
    case kFloat16:
      backward_segments_kernel<__half><<<blocks_for(S), threads, 0, st>>>(
          reinterpret_cast<const __half*>(grad), ss, pp, sg, S, D,
          reinterpret_cast<__half*>(grad_weight), V, reinterpret_cast<__half*>(grad_image), M,
          gf);
      break;
    default:
      backward_segments_kernel<__nv_bfloat16><<<blocks_for(S), threads, 0, st>>>(
          reinterpret_cast<const __nv_bfloat16*>(grad), ss, pp, sg, S, D,
          reinterpret_cast<__nv_bfloat16*>(grad_weight), V,
          reinterpret_cast<__nv_bfloat16*>(grad_image), M, gf);
      break;
  }
  check(cudaGetLastError(), "masked_embedding_backward_segments_cuda");
}

}  // namespace aimkp
