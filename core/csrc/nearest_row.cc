// orthoad_nearest_row: every query's nearest bank row, exact, in one pruned sweep of the bank, on CPU.
//
// Inputs (contiguous float32):
//   queries (R, D)       rows in the bank's centred principal basis (knn.BankSearch.center)
//   bounds  (T, W, 8)    the bank's lifted bound rows [-2 b_h, |b|^2, -2 |b_t|] (W = head + 2) in
//                        tiles of 8 rows: bounds[t][c][l] is column c of row 8 t + l; padding rows
//                        (T * 8 > M) are never measured
//   lifted  (M, D + 1)   the bank's rows lifted, [-2 b, |b|^2] (knn.BankSearch.lifted)
// Attributes: margin (relative rounding margin of the bound, knn.rounding_margin) and radius (the
// largest |b|).
// Outputs: distance (R,) float32, the smallest |q - b| (measured in float64), and index (R,) int64,
// its row, lowest index on ties. A query holding a NaN or an infinity gets NaN and row 0.
//
// With h the first W - 2 coordinates and t the rest, |q - b|^2 >= |q|^2 + [q_h, 1, |q_t|] . [-2 b_h,
// |b|^2, -2 |b_t|] = |q_h - b_h|^2 + (|q_t| - |b_t|)^2. The sweep computes that bound for a
// register tile of 6 queries x 16 rows at a time and measures a row exactly (coordinate
// differences, float64) only when its bound is within the query's nearest distance so far plus
// margin * (|q| + radius)^2, which covers the bound's float32 rounding (the caller rounds margin
// and radius up to float32): every other row is provably farther. A first pass sweeps one pair of
// tiles in kSeedStride (spread over the bank), the second all the others in index order; a
// measured row replaces the nearest when nearer, or as near with a lower index, so ties go to the
// lowest index whatever the pass. Only the amount of measuring depends on the data: about 80 of
// 77,824 rows per query on the magnetic-tile bank of docs/benchmarks.md (simulated), every row when
// the bounds prove nothing (then the sweep costs the brute force plus the bounds).
//
// Each OpenMP thread takes a contiguous share of the queries and passes them all over one chunk of
// the bank (kChunkTiles tiles, 135 KB at W = 66) before the next, so the chunk is read from the
// core's cache, not from memory, once per group of 6 queries.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "paddle/extension.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 8;        // bank rows per tile (one AVX2 register of float32)
constexpr int kGroup = 6;            // queries per register tile
constexpr int64_t kChunkTiles = 64;  // bank tiles swept by a thread's queries before the next ones
constexpr int64_t kSeedStride = 16;  // one pair of tiles in this many is swept first (Seeded)
static_assert(kChunkTiles % 2 == 0, "chunks must start on a pair of tiles in both passes");

// One query's search state.
struct Search {
  double squared = 0.0;  // |q|^2
  double slack = 0.0;    // margin (|q| + radius)^2
  double best = std::numeric_limits<double>::infinity();  // nearest squared distance so far
  int64_t index = 0;
  float limit = std::numeric_limits<float>::infinity();  // measure rows whose bound - |q|^2 is <= this
};

// The float32 at or above x (the comparison may only err towards measuring).
float RoundedUp(double x) {
  if (x >= std::numeric_limits<float>::max()) return std::numeric_limits<float>::infinity();
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Squared distance, in float64, from query q (D) to the bank row whose lifted row is -2 b.
double Measure(const float* q, const float* lifted_row, int64_t d) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) {
    const double diff = static_cast<double>(q[j]) + 0.5 * static_cast<double>(lifted_row[j]);
    sum += diff * diff;
  }
  return sum;
}

// acc[g][u] (8 rows) = the products of G lifted queries (ql, W wide) with U consecutive tiles.
template <int G, int U>
inline void Bounds(const float* ql, const float* tile, int64_t w, float (&acc)[G][U][kLanes]) {
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) std::fill(acc[g][u], acc[g][u] + kLanes, 0.0f);
  for (int64_t c = 0; c < w; ++c) {
    for (int u = 0; u < U; ++u) {
      const float* b = tile + (u * w + c) * kLanes;
      for (int g = 0; g < G; ++g) {
        const float a = ql[g * w + c];
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[g][u][l] += a * b[l];
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// The full register tile (6 queries x 2 tiles) with its 12 accumulators in named registers: held
// in an array, GCC stores every one of them to the stack on each step.
template <>
inline void Bounds<kGroup, 2>(const float* ql, const float* tile, int64_t w,
                              float (&acc)[kGroup][2][kLanes]) {
  __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00;
  __m256 s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
  const float* t0 = tile;
  const float* t1 = tile + w * kLanes;
  for (int64_t c = 0; c < w; ++c) {
    const __m256 b0 = _mm256_loadu_ps(t0 + c * kLanes), b1 = _mm256_loadu_ps(t1 + c * kLanes);
    const auto step = [&](int g, __m256& lo, __m256& hi) {  // one query's 16 bounds, one column
      const __m256 a = _mm256_broadcast_ss(ql + g * w + c);
      lo = _mm256_fmadd_ps(a, b0, lo);
      hi = _mm256_fmadd_ps(a, b1, hi);
    };
    step(0, s00, s01);
    step(1, s10, s11);
    step(2, s20, s21);
    step(3, s30, s31);
    step(4, s40, s41);
    step(5, s50, s51);
  }
  const __m256 sums[kGroup][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}, {s40, s41}, {s50, s51}};
  for (int g = 0; g < kGroup; ++g)
    for (int u = 0; u < 2; ++u) _mm256_storeu_ps(acc[g][u], sums[g][u]);
}
#endif

// Bounds (minus |q|^2) of G queries against U consecutive tiles from row first_row, then every row
// within a query's limit measured, in row order.
template <int G, int U>
void SweepTiles(const float* ql, const float* tile, int64_t w, int64_t first_row, int64_t m,
                const float* queries, const float* lifted, int64_t d, Search* search) {
  float acc[G][U][kLanes];
  Bounds<G, U>(ql, tile, w, acc);
  for (int g = 0; g < G; ++g) {
    Search& s = search[g];
    for (int u = 0; u < U; ++u) {
      unsigned hits = 0;
      for (int64_t l = 0; l < kLanes; ++l) hits |= static_cast<unsigned>(acc[g][u][l] <= s.limit) << l;
      while (hits) {
        const int l = __builtin_ctz(hits);
        hits &= hits - 1;
        const int64_t row = first_row + u * kLanes + l;
        if (row >= m || !(acc[g][u][l] <= s.limit)) continue;  // padding, or ruled out meanwhile
        const double distance = Measure(queries + g * d, lifted + row * (d + 1), d);
        if (distance < s.best || (distance == s.best && row < s.index)) {
          s.best = distance;
          s.index = row;
          s.limit = RoundedUp(distance - s.squared + s.slack);
        }
      }
    }
  }
}

// Whether pair of tiles p (tiles 2p, 2p + 1) is in the seed pass: one pair in kSeedStride, spread
// over the bank, swept first so that every query starts the main pass with a near row.
inline bool Seeded(int64_t pair) { return pair % kSeedStride == kSeedStride / 2; }

// The tiles [t0, t1) (t0 even) of one pass: the seeded pairs (seed), or all the others and a last
// odd tile.
template <int G>
void SweepChunk(const float* ql, const float* bounds, int64_t w, int64_t t0, int64_t t1, bool seed,
                int64_t m, const float* queries, const float* lifted, int64_t d, Search* search) {
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) {
    if (Seeded(t / 2) != seed) continue;
    SweepTiles<G, 2>(ql, bounds + t * w * kLanes, w, t * kLanes, m, queries, lifted, d, search);
  }
  if (t < t1 && !seed) {
    SweepTiles<G, 1>(ql, bounds + t * w * kLanes, w, t * kLanes, m, queries, lifted, d, search);
  }
}

using ChunkFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, bool, int64_t, const float*,
                         const float*, int64_t, Search*);
constexpr ChunkFn kChunk[kGroup + 1] = {nullptr,          SweepChunk<1>, SweepChunk<2>, SweepChunk<3>,
                                        SweepChunk<4>,    SweepChunk<5>, SweepChunk<6>};

// The queries [q0, q1) searched over the whole bank; results into dist and index.
void SearchQueries(const float* queries, const float* bounds, const float* lifted, int64_t q0, int64_t q1,
                   int64_t d, int64_t w, int64_t tiles, int64_t m, double margin, double radius,
                   float* dist, int64_t* index) {
  const int64_t count = q1 - q0, head = w - 2;
  std::vector<float> ql(count * w);
  std::vector<Search> search(count);
  for (int64_t i = 0; i < count; ++i) {
    const float* q = queries + (q0 + i) * d;
    double squared = 0.0, tail = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double v = q[j];
      squared += v * v;
      if (j >= head) tail += v * v;
    }
    Search& s = search[i];
    s.squared = squared;
    const double reach = std::sqrt(squared) + radius;
    s.slack = margin * reach * reach;
    if (!std::isfinite(squared)) s.limit = std::numeric_limits<float>::quiet_NaN();  // no row is ever <= NaN
    float* row = ql.data() + i * w;
    std::copy(q, q + head, row);
    row[head] = 1.0f;
    row[head + 1] = static_cast<float>(std::sqrt(tail));
  }
  for (const bool seed : {true, false}) {  // chunks of kChunkTiles tiles swept in each pass
    const int64_t span = seed ? kChunkTiles * kSeedStride : kChunkTiles;
    for (int64_t t0 = 0; t0 < tiles; t0 += span) {
      const int64_t t1 = std::min(tiles, t0 + span);
      for (int64_t i = 0; i < count; i += kGroup) {
        const int g = static_cast<int>(std::min<int64_t>(kGroup, count - i));
        kChunk[g](ql.data() + i * w, bounds, w, t0, t1, seed, m, queries + (q0 + i) * d, lifted, d,
                  search.data() + i);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const Search& s = search[i];
    const bool finite = std::isfinite(s.squared);
    dist[q0 + i] = finite ? static_cast<float>(std::sqrt(s.best)) : std::numeric_limits<float>::quiet_NaN();
    index[q0 + i] = finite ? s.index : 0;
  }
}

}  // namespace

std::vector<paddle::Tensor> NearestRow(const paddle::Tensor& queries, const paddle::Tensor& bounds,
                                       const paddle::Tensor& lifted, float margin, float radius) {
  PD_CHECK(queries.is_cpu() && bounds.is_cpu() && lifted.is_cpu(),
           "orthoad_nearest_row runs on CPU only; export with --head matmul for a GPU");
  PD_CHECK(queries.dtype() == paddle::DataType::FLOAT32 && bounds.dtype() == paddle::DataType::FLOAT32 &&
               lifted.dtype() == paddle::DataType::FLOAT32,
           "orthoad_nearest_row: queries, bounds and bank must be float32");
  PD_CHECK(queries.shape().size() == 2 && bounds.shape().size() == 3 && lifted.shape().size() == 2,
           "orthoad_nearest_row: queries (R, D), bounds (T, W, 8), bank (M, D + 1)");
  const int64_t r = queries.shape()[0], d = queries.shape()[1];
  const int64_t tiles = bounds.shape()[0], w = bounds.shape()[1], m = lifted.shape()[0];
  PD_CHECK(lifted.shape()[1] == d + 1 && bounds.shape()[2] == kLanes && w >= 2 && w - 2 <= d && m >= 1 &&
               tiles * kLanes >= m && (tiles - 1) * kLanes < m,
           "orthoad_nearest_row: bounds / bank shapes do not fit the queries");
  auto dist = paddle::empty({r}, paddle::DataType::FLOAT32, queries.place());
  auto index = paddle::empty({r}, paddle::DataType::INT64, queries.place());
  const float* qd = queries.data<float>();
  const float* bd = bounds.data<float>();
  const float* ld = lifted.data<float>();
  float* dd = dist.data<float>();
  int64_t* id = index.data<int64_t>();
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t q0 = r * thread / threads, q1 = r * (thread + 1) / threads;
    if (q1 > q0) SearchQueries(qd, bd, ld, q0, q1, d, w, tiles, m, margin, radius, dd, id);
  }
  return {dist, index};
}

std::vector<std::vector<int64_t>> NearestRowShape(const std::vector<int64_t>& queries,
                                                  const std::vector<int64_t>& /*bounds*/,
                                                  const std::vector<int64_t>& /*lifted*/) {
  return {{queries[0]}, {queries[0]}};
}

std::vector<paddle::DataType> NearestRowDtype(const paddle::DataType& queries,
                                              const paddle::DataType& /*bounds*/,
                                              const paddle::DataType& /*lifted*/) {
  return {queries, paddle::DataType::INT64};
}

PD_BUILD_OP(orthoad_nearest_row)
    .Inputs({"Queries", "Bounds", "Bank"})
    .Outputs({"Distance", "Index"})
    .Attrs({"margin: float", "radius: float"})
    .SetKernelFn(PD_KERNEL(NearestRow))
    .SetInferShapeFn(PD_INFER_SHAPE(NearestRowShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(NearestRowDtype));
