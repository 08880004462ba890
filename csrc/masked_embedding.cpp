// CPU kernels of aimkp.ops.masked_embedding: a pure row gather (forward) and an atomic-free,
// deterministic segment reduction (backward). OpenMP over rows; compute in fp32.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace aimkp {

int max_threads() { return omp_get_max_threads(); }

namespace {
int resolve_threads(int threads, std::size_t bytes) {
  if (bytes < kParallelBytes) return 1;
  return threads > 0 ? threads : omp_get_max_threads();
}
}  // namespace

void masked_embedding_forward_cpu(uintptr_t out, uintptr_t src, int64_t K, int64_t D,
                                  uintptr_t weight, int64_t V, int64_t weight_stride,
                                  uintptr_t image, int64_t M, int64_t image_stride, uintptr_t fill,
                                  int dtype, int threads) {
  const std::size_t es = dtype_size(dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(D) * es;
  char* o = reinterpret_cast<char*>(out);
  const int64_t* s = reinterpret_cast<const int64_t*>(src);
  const char* w = reinterpret_cast<const char*>(weight);
  const char* img = reinterpret_cast<const char*>(image);
  const char* f = reinterpret_cast<const char*>(fill);
  // Output dtype == input dtype, so the forward is an exact copy: memcpy per row.
  const int nt = resolve_threads(threads, static_cast<std::size_t>(K) * row_bytes);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = s[k];
    const char* from = nullptr;
    if (r >= 0 && r < V) {
      from = w + static_cast<std::size_t>(r) * static_cast<std::size_t>(weight_stride) * es;
    } else if (img != nullptr && r >= V && r < V + M) {
      from = img + static_cast<std::size_t>(r - V) * static_cast<std::size_t>(image_stride) * es;
    } else {
      from = f;  // fill row (nullptr: zeros)
    }
    char* dst = o + static_cast<std::size_t>(k) * row_bytes;
    if (from != nullptr) {
      std::memcpy(dst, from, row_bytes);
    } else {
      std::memset(dst, 0, row_bytes);
    }
  }
}

namespace {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};
struct Half {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};
template <>
struct Cvt<Half> {
  static inline float load(Half x) { return half_to_float(x.bits); }
  static inline Half store(float x) { return Half{float_to_half(x)}; }
};
template <>
struct Cvt<BF16> {
  static inline float load(BF16 x) { return bf16_to_float(x.bits); }
  static inline BF16 store(float x) { return BF16{float_to_bf16(x)}; }
};

// Sum of grad rows perm[a..b) (in that order: deterministic) into acc [D], fp32.
template <typename T>
inline void accumulate_rows(const T* grad, const int64_t* perm, int64_t a, int64_t b, int64_t D,
                            int64_t d0, int64_t d1, float* acc) {
  for (int64_t d = d0; d < d1; ++d) acc[d - d0] = 0.f;
  for (int64_t i = a; i < b; ++i) {
    const T* g = grad + perm[i] * D;
#pragma omp simd
    for (int64_t d = d0; d < d1; ++d) acc[d - d0] += Cvt<T>::load(g[d]);
  }
}

// Writes dst rows [0, R) of width D: rows with seg_of_row >= 0 get the segment's sum, others 0.
template <typename T>
void write_segment_sums(const T* grad, const int64_t* perm, const std::vector<int64_t>& starts,
                        const std::vector<int64_t>& seg_of_row, int64_t R, int64_t D, T* dst,
                        int threads) {
  const int nt = resolve_threads(threads, static_cast<std::size_t>(R * D) * sizeof(T));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> acc(static_cast<std::size_t>(D));
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < R; ++r) {
      T* out = dst + r * D;
      const int64_t seg = seg_of_row[static_cast<std::size_t>(r)];
      if (seg < 0) {
        std::memset(static_cast<void*>(out), 0, static_cast<std::size_t>(D) * sizeof(T));
        continue;
      }
      const int64_t a = starts[static_cast<std::size_t>(seg)];
      const int64_t b = starts[static_cast<std::size_t>(seg) + 1];
      if (b - a == 1) {  // single occurrence: exact copy, no rounding
        std::memcpy(static_cast<void*>(out), grad + perm[a] * D,
                    static_cast<std::size_t>(D) * sizeof(T));
        continue;
      }
      accumulate_rows(grad, perm, a, b, D, 0, D, acc.data());
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] = Cvt<T>::store(acc[static_cast<std::size_t>(d)]);
    }
  }
}

template <typename T>
void backward_impl(const T* grad, int64_t K, int64_t D, const int64_t* sorted, const int64_t* perm,
                   T* gw, int64_t V, T* gi, int64_t M, float* gf, int threads) {
  // Segments of equal ids in the sorted order (serial scan over K ints: cheap).
  std::vector<int64_t> starts;
  starts.reserve(static_cast<std::size_t>(std::min<int64_t>(K, 1 << 20)) + 1);
  for (int64_t i = 0; i < K; ++i) {
    if (i == 0 || sorted[i] != sorted[i - 1]) starts.push_back(i);
  }
  starts.push_back(K);
  const int64_t S = static_cast<int64_t>(starts.size()) - 1;
  const int64_t fill_a = 0;  // rows [fill_a, fill_b) have the fill row as source
  int64_t fill_b = 0;
  std::vector<int64_t> seg_of_row(gw ? static_cast<std::size_t>(V) : 0, -1);
  std::vector<int64_t> seg_of_img(gi ? static_cast<std::size_t>(M) : 0, -1);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t id = sorted[starts[static_cast<std::size_t>(s)]];
    if (id < 0) {  // every negative id means "fill"; they sort first, so rows [0, fill_b)
      fill_b = starts[static_cast<std::size_t>(s) + 1];
    } else if (id < V) {
      if (gw) seg_of_row[static_cast<std::size_t>(id)] = s;
    } else if (id < V + M) {
      if (gi) seg_of_img[static_cast<std::size_t>(id - V)] = s;
    }  // ids >= V + M never occur after validation; they are ignored here (no OOB write)
  }
  if (gw) write_segment_sums(grad, perm, starts, seg_of_row, V, D, gw, threads);
  if (gi) write_segment_sums(grad, perm, starts, seg_of_img, M, D, gi, threads);
  if (gf) {
    // Fill gradient: columns split across threads, each sums every fill row in order.
    const int nt =
        resolve_threads(threads, static_cast<std::size_t>((fill_b - fill_a) * D) * sizeof(T));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      const int64_t nth = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t chunk = ((D + nth - 1) / nth + 15) / 16 * 16;
      const int64_t d0 = std::min(D, t * chunk), d1 = std::min(D, d0 + chunk);
      if (d1 > d0) accumulate_rows(grad, perm, fill_a, fill_b, D, d0, d1, gf + d0);
    }
  }
}

}  // namespace

void masked_embedding_backward_cpu(uintptr_t grad, int64_t K, int64_t D, uintptr_t sorted_src,
                                   uintptr_t perm, uintptr_t grad_weight, int64_t V,
                                   uintptr_t grad_image, int64_t M, uintptr_t grad_fill,
                                   int dtype, int threads) {
  const int64_t* s = reinterpret_cast<const int64_t*>(sorted_src);
  const int64_t* p = reinterpret_cast<const int64_t*>(perm);
  float* gf = reinterpret_cast<float*>(grad_fill);
  switch (dtype) {
    case kFloat32:
      backward_impl(reinterpret_cast<const float*>(grad), K, D, s, p,
                    reinterpret_cast<float*>(grad_weight), V, reinterpret_cast<float*>(grad_image),
                    M, gf, threads);
      break;
    case kFloat16:
      backward_impl(reinterpret_cast<const Half*>(grad), K, D, s, p,
                    reinterpret_cast<Half*>(grad_weight), V, reinterpret_cast<Half*>(grad_image),
                    M, gf, threads);
      break;
    default:
      backward_impl(reinterpret_cast<const BF16*>(grad), K, D, s, p,
                    reinterpret_cast<BF16*>(grad_weight), V, reinterpret_cast<BF16*>(grad_image),
                    M, gf, threads);
      break;
  }
}

}  // namespace aimkp
