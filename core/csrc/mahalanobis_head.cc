// orthoad_mahalanobis_head: the Mahalanobis distance of every position's feature, fused, on CPU.
//
// Inputs (contiguous):
//   z      (N, k, P)          float32 features of P positions (row-major h * w)
//   mean   (T, k, 8)          float32 mean of each position, in tiles of 8 positions (T = ceil(P / 8))
//   packed (T, k(k+1)/2, 8)   each position's lower Cholesky factor L of the inverse covariance
//                             (inv = L L^T), column by column (L[j][j], L[j+1][j], ..., L[k-1][j]),
//                             in the same tiles; padding positions hold zeros. float32, or float16 /
//                             bfloat16 (half the bytes to read; widened to float32 as it is read)
// Output: float32 (N, P) = sqrt(||L^T (z - mean)||^2) = sqrt((z - mean)^T inv (z - mean)),
// accumulated in float32 whatever the factor's storage.
//
// Every factor value is read once per group of up to 4 images, so at batch 1 the operator streams
// the k(k+1)/2 values per position from memory once: half of the full matrices' bytes, with no
// intermediate tensor. Tiles are shared among the OpenMP threads of the process (Paddle's
// cpu_math_library_num_threads when linked against Paddle's libiomp5).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

#ifdef __F16C__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 8;  // positions per tile (one AVX2 register of float32)
constexpr int kGroup = 4;      // images sharing one read of a tile's factor

// One tile row of the factor (kLanes values) as float32: float32 rows are read in place, 16-bit
// rows are widened into ``buffer``.
inline const float* Widen(const float* f, float* /*buffer*/) { return f; }
inline const float* Widen(const paddle::float16* f, float* buffer) {
#ifdef __F16C__  // the 8 values in one instruction (Paddle's own conversion takes one at a time)
  _mm256_storeu_ps(buffer, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(f))));
#else
  for (int64_t l = 0; l < kLanes; ++l) buffer[l] = static_cast<float>(f[l]);
#endif
  return buffer;
}
inline const float* Widen(const paddle::bfloat16* f, float* buffer) {  // the upper half of a float32
  uint32_t bits[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) bits[l] = static_cast<uint32_t>(f[l].x) << 16;
  std::memcpy(buffer, bits, sizeof bits);
  return buffer;
}

// Squared distances (G, kLanes) of G images' centred features d (G, k, kLanes) in one tile. Each
// column's dot products run in kChains independent sums per image (rows i, i + 1, ... taken in
// turn), so that consecutive multiply-adds do not wait for each other: with one sum per image the
// loop is bound by the FMA latency, not by reading the factor.
template <int G, typename T>
void TileDistance(const T* factor, const float* d, int64_t k, float* squared) {
  constexpr int kChains = G >= 4 ? 1 : 4 / G;
  float total[G][kLanes] = {};
  const T* f = factor;
  for (int64_t j = 0; j < k; ++j) {
    float acc[kChains][G][kLanes] = {};
    int64_t i = j;
    for (; i + kChains <= k; i += kChains) {
      for (int c = 0; c < kChains; ++c, f += kLanes) {
        float buffer[kLanes];
        const float* fi = Widen(f, buffer);
        for (int g = 0; g < G; ++g) {
          const float* di = d + (g * k + i + c) * kLanes;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[c][g][l] += fi[l] * di[l];
        }
      }
    }
    for (int c = 0; i < k; ++i, ++c, f += kLanes) {  // the last rows of the column (fewer than kChains)
      float buffer[kLanes];
      const float* fi = Widen(f, buffer);
      for (int g = 0; g < G; ++g) {
        const float* di = d + (g * k + i) * kLanes;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[c][g][l] += fi[l] * di[l];
      }
    }
    for (int g = 0; g < G; ++g) {
      float sum[kLanes] = {};
      for (int c = 0; c < kChains; ++c) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) sum[l] += acc[c][g][l];
      }
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) total[g][l] += sum[l] * sum[l];
    }
  }
  for (int g = 0; g < G; ++g) std::copy(total[g], total[g] + kLanes, squared + g * kLanes);
}

template <typename T>
void GroupDistance(int g, const T* factor, const float* d, int64_t k, float* squared) {
  switch (g) {
    case 4: TileDistance<4>(factor, d, k, squared); break;
    case 3: TileDistance<3>(factor, d, k, squared); break;
    case 2: TileDistance<2>(factor, d, k, squared); break;
    default: TileDistance<1>(factor, d, k, squared);
  }
}

// The distances (N, P) into out; factor points at the packed tiles stored as T.
template <typename T>
void HeadDistances(const float* zd, const float* md, const T* fd, int64_t n, int64_t k, int64_t p,
                   int64_t tiles, float* od) {
  const int64_t npack = k * (k + 1) / 2;
#pragma omp parallel
  {
    std::vector<float> d(kGroup * k * kLanes);
    float squared[kGroup * kLanes];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t p0 = t * kLanes, lanes = std::min(kLanes, p - p0);
      for (int64_t n0 = 0; n0 < n; n0 += kGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kGroup, n - n0));
        for (int gi = 0; gi < g; ++gi) {
          for (int64_t i = 0; i < k; ++i) {
            const float* src = zd + ((n0 + gi) * k + i) * p + p0;
            const float* mu = md + (t * k + i) * kLanes;
            float* dst = d.data() + (gi * k + i) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) dst[l] = l < lanes ? src[l] - mu[l] : 0.f;
          }
        }
        GroupDistance(g, fd + t * npack * kLanes, d.data(), k, squared);
        for (int gi = 0; gi < g; ++gi) {
          for (int64_t l = 0; l < lanes; ++l) {
            od[(n0 + gi) * p + p0 + l] = std::sqrt(squared[gi * kLanes + l]);  // a sum of squares; NaN stays NaN
          }
        }
      }
    }
  }
}

}  // namespace

std::vector<paddle::Tensor> MahalanobisHead(const paddle::Tensor& z, const paddle::Tensor& mean,
                                            const paddle::Tensor& packed) {
  PD_CHECK(z.is_cpu() && mean.is_cpu() && packed.is_cpu(),
           "orthoad_mahalanobis_head runs on CPU only; export with --head matmul for a GPU");
  PD_CHECK(z.dtype() == paddle::DataType::FLOAT32 && mean.dtype() == paddle::DataType::FLOAT32,
           "orthoad_mahalanobis_head: features and mean must be float32");
  PD_CHECK(z.shape().size() == 3 && mean.shape().size() == 3 && packed.shape().size() == 3,
           "orthoad_mahalanobis_head: features (N, k, P), mean (T, k, 8), factor (T, k(k+1)/2, 8)");
  const auto& shape = z.shape();
  const int64_t n = shape[0], k = shape[1], p = shape[2];
  const int64_t tiles = packed.shape()[0], npack = k * (k + 1) / 2;
  PD_CHECK(packed.shape()[1] == npack && packed.shape()[2] == kLanes && tiles * kLanes >= p &&
               (tiles - 1) * kLanes < p && mean.shape()[0] == tiles && mean.shape()[1] == k &&
               mean.shape()[2] == kLanes,
           "orthoad_mahalanobis_head: mean / factor shapes do not fit the features");
  auto out = paddle::empty({n, p}, paddle::DataType::FLOAT32, z.place());
  const float* zd = z.data<float>();
  const float* md = mean.data<float>();
  float* od = out.data<float>();
  switch (packed.dtype()) {
    case paddle::DataType::FLOAT16:
      HeadDistances(zd, md, packed.data<paddle::float16>(), n, k, p, tiles, od);
      break;
    case paddle::DataType::BFLOAT16:
      HeadDistances(zd, md, packed.data<paddle::bfloat16>(), n, k, p, tiles, od);
      break;
    case paddle::DataType::FLOAT32:
      HeadDistances(zd, md, packed.data<float>(), n, k, p, tiles, od);
      break;
    default:
      PD_THROW("orthoad_mahalanobis_head: the factor must be float32, float16 or bfloat16");
  }
  return {out};
}

std::vector<std::vector<int64_t>> MahalanobisHeadShape(const std::vector<int64_t>& z,
                                                      const std::vector<int64_t>& /*mean*/,
                                                      const std::vector<int64_t>& /*packed*/) {
  return {{z[0], z[2]}};
}

std::vector<paddle::DataType> MahalanobisHeadDtype(const paddle::DataType& z,
                                                  const paddle::DataType& /*mean*/,
                                                  const paddle::DataType& /*packed*/) {
  return {z};
}

PD_BUILD_OP(orthoad_mahalanobis_head)
    .Inputs({"Z", "Mean", "Factor"})
    .Outputs({"Distance"})
    .SetKernelFn(PD_KERNEL(MahalanobisHead))
    .SetInferShapeFn(PD_INFER_SHAPE(MahalanobisHeadShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MahalanobisHeadDtype));
