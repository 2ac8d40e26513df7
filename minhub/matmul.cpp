// minhub::linear(x, W, b, scale): y = x @ W.T (* scale) (+ b) for the few activation rows of decoding, reading each
// weight once at the speed of memory. minhub/matmul.py builds it once per machine (the C++ compiler against the
// installed torch), measures it against PyTorch's kernels, and loads it with torch.ops.load_library.
//
// x (..., k) float32 or bfloat16, m rows in all; W (n, k) in x's dtype, or int8 with one scale per output row
// (float32 or bfloat16); b (n,) in x's dtype or absent; y (..., n) in x's dtype; sums in float32. W is either
// row-major (nn.Linear's layout, "rows") or, in float32, the transposed view of a (k, n) matrix (the hub's GPT-2
// layout, "columns"). Threads take 256 kB chunks of W in turn and read each once, sequentially; x stays in the L1
// cache. The AVX2 loops run where the CPU has AVX2 and FMA, the portable ones everywhere else and wherever `portable`
// asks for them (as the tests do).
//
// minhub::attend(q, k, v, scale), further down, is attention for the one new query of a decode step; the compiled
// decode step (minhub/precompiled.py) calls it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 4;  // weight rows summed side by side

struct Problem {  // y[i, j] = (sum_c x[i, c] * W[j, c]) * scale[j] + bias[j], i < m, j < n, c < k
  const float* x;
  int64_t m, k, n;
  const float* scale;  // or nullptr
};

template <typename X>
inline void store(X* y, const X* bias, int64_t j, float sum) {
  *y = static_cast<X>(bias ? sum + static_cast<float>(bias[j]) : sum);
}

// ---- the portable loops -------------------------------------------------------------------------------------------

template <typename X, typename W>
void rows_portable(const Problem& p, const W* w, const X* bias, X* y, int64_t first, int64_t last) {
  for (int64_t j = first; j < last; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      float sum = 0;
      for (int64_t c = 0; c < p.k; ++c) sum += p.x[i * p.k + c] * static_cast<float>(w[j * p.k + c]);
      store(y + i * p.n + j, bias, j, p.scale ? sum * p.scale[j] : sum);
    }
  }
}

// acc[i, :] += x[i, c0:c1] @ w[c0:c1, :], w being the (k, n) matrix
void columns_portable(const Problem& p, const float* w, float* acc, int64_t c0, int64_t c1) {
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t j = 0; j < p.n; ++j) acc[i * p.n + j] += p.x[i * p.k + c] * w[c * p.n + j];
}

#if defined(__x86_64__)
// ---- the AVX2 loops -----------------------------------------------------------------------------------------------

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8(const c10::BFloat16* p) {  // a bf16 is the top half of a float32
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
AVX2 inline __m256 load8(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
AVX2 inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One activation row (batch-1 decoding, the hot path) times four weight rows, 16 columns a step. block_avx2<1> below
// computes the same with one sum per row; it read fp32 at 0.86-0.93x `.sum()`'s speed against this loop's 0.98-1.00.
template <typename X, typename W>
AVX2 void one_row_avx2(const Problem& p, const W* w, const X* bias, X* y, int64_t first, int64_t last) {
  const int64_t k = p.k, k16 = k - k % 16;
  const float* x = p.x;
  int64_t j = first;
  for (; j + kRowBlock <= last; j += kRowBlock) {
    const W* r = w + j * k;
    // two sums per row, over alternate groups of 8: eight independent FMA chains keep the loads coming
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    // the next block of rows, fetched while this one is summed: the hardware prefetcher alone falls behind
    const char* next = reinterpret_cast<const char*>(r + kRowBlock * k);
    for (int64_t c = 0; c < k16; c += 16) {
      for (size_t line = 0; line < sizeof(W); ++line)
        _mm_prefetch(next + (c * sizeof(W) + line * 16) * kRowBlock, _MM_HINT_T0);
      __m256 xa = _mm256_loadu_ps(x + c), xb = _mm256_loadu_ps(x + c + 8);
      s0 = _mm256_fmadd_ps(load8(r + c), xa, s0);
      s1 = _mm256_fmadd_ps(load8(r + k + c), xa, s1);
      s2 = _mm256_fmadd_ps(load8(r + 2 * k + c), xa, s2);
      s3 = _mm256_fmadd_ps(load8(r + 3 * k + c), xa, s3);
      t0 = _mm256_fmadd_ps(load8(r + c + 8), xb, t0);
      t1 = _mm256_fmadd_ps(load8(r + k + c + 8), xb, t1);
      t2 = _mm256_fmadd_ps(load8(r + 2 * k + c + 8), xb, t2);
      t3 = _mm256_fmadd_ps(load8(r + 3 * k + c + 8), xb, t3);
    }
    float sums[kRowBlock] = {sum8(_mm256_add_ps(s0, t0)), sum8(_mm256_add_ps(s1, t1)),
                             sum8(_mm256_add_ps(s2, t2)), sum8(_mm256_add_ps(s3, t3))};
    for (int64_t b = 0; b < kRowBlock; ++b) {
      for (int64_t c = k16; c < k; ++c) sums[b] += x[c] * static_cast<float>(r[b * k + c]);
      store(y + j + b, bias, j + b, p.scale ? sums[b] * p.scale[j + b] : sums[b]);
    }
  }
  rows_portable(p, w, bias, y, j, last);  // the last rows that do not fill a block
}

// M activation rows (1 or 2) times four weight rows: each load feeds one or two FMAs, 4M independent sums
template <int M, typename X, typename W>
AVX2 void block_avx2(const Problem& p, const float* x, const W* r, const X* bias, X* y, int64_t j) {
  const int64_t k = p.k, k8 = k - k % 8;
  __m256 s[M][kRowBlock];
  for (int i = 0; i < M; ++i)
    for (int b = 0; b < kRowBlock; ++b) s[i][b] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(r + kRowBlock * k);  // the next rows, as in one_row_avx2
  for (int64_t c = 0; c < k8; c += 8) {
    _mm_prefetch(next + c * kRowBlock * sizeof(W), _MM_HINT_T0);
    __m256 xv[M];
    for (int i = 0; i < M; ++i) xv[i] = _mm256_loadu_ps(x + i * k + c);
    for (int b = 0; b < kRowBlock; ++b) {
      const __m256 wv = load8(r + b * k + c);
      for (int i = 0; i < M; ++i) s[i][b] = _mm256_fmadd_ps(wv, xv[i], s[i][b]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int64_t b = 0; b < kRowBlock; ++b) {
      float sum = sum8(s[i][b]);
      for (int64_t c = k8; c < k; ++c) sum += x[i * k + c] * static_cast<float>(r[b * k + c]);
      store(y + i * p.n + j + b, bias, j + b, p.scale ? sum * p.scale[j + b] : sum);
    }
  }
}

template <typename X, typename W>
AVX2 void rows_avx2(const Problem& p, const W* w, const X* bias, X* y, int64_t first, int64_t last) {
  if (p.m == 1) return one_row_avx2(p, w, bias, y, first, last);
  int64_t j = first;
  for (; j + kRowBlock <= last; j += kRowBlock) {  // read from memory once, from L1 for the next activation rows
    const W* r = w + j * p.k;
    int64_t i = 0;
    for (; i + 2 <= p.m; i += 2) block_avx2<2>(p, p.x + i * p.k, r, bias, y + i * p.n, j);
    if (i < p.m) block_avx2<1>(p, p.x + i * p.k, r, bias, y + i * p.n, j);
  }
  rows_portable(p, w, bias, y, j, last);  // the last rows that do not fill a block
}

// acc[i:i+M, :] += x[i:i+M, c:c+4] @ w[c:c+4, :] for M activation rows (1 or 2): each weight load feeds M FMAs
template <int M>
AVX2 void columns_block_avx2(const Problem& p, const float* w, int64_t c, int64_t i, float* acc) {
  const int64_t n = p.n, n8 = n - n % 8;
  const float* r = w + c * n;
  __m256 xv[M][4];
  for (int a = 0; a < M; ++a)
    for (int b = 0; b < 4; ++b) xv[a][b] = _mm256_set1_ps(p.x[(i + a) * p.k + c + b]);
  int64_t j = 0;
  for (; j < n8; j += 8) {
    const __m256 w0 = _mm256_loadu_ps(r + j), w1 = _mm256_loadu_ps(r + n + j), w2 = _mm256_loadu_ps(r + 2 * n + j),
                 w3 = _mm256_loadu_ps(r + 3 * n + j);
    for (int a = 0; a < M; ++a) {
      float* out = acc + (i + a) * n + j;
      __m256 sum = _mm256_loadu_ps(out);
      sum = _mm256_fmadd_ps(xv[a][0], w0, sum);
      sum = _mm256_fmadd_ps(xv[a][1], w1, sum);
      sum = _mm256_fmadd_ps(xv[a][2], w2, sum);
      sum = _mm256_fmadd_ps(xv[a][3], w3, sum);
      _mm256_storeu_ps(out, sum);
    }
  }
  for (; j < n; ++j)
    for (int a = 0; a < M; ++a) {
      const float* xi = p.x + (i + a) * p.k + c;
      acc[(i + a) * n + j] += xi[0] * r[j] + xi[1] * r[n + j] + xi[2] * r[2 * n + j] + xi[3] * r[3 * n + j];
    }
}

AVX2 void columns_avx2(const Problem& p, const float* w, float* acc, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {  // four rows of the (k, n) matrix at a time: a quarter of the loads and stores of acc
    int64_t i = 0;
    for (; i + 2 <= p.m; i += 2) columns_block_avx2<2>(p, w, c, i, acc);
    if (i < p.m) columns_block_avx2<1>(p, w, c, i, acc);
  }
  columns_portable(p, w, acc, c, c1);
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_has_avx2() { return false; }
template <typename X, typename W>
void rows_avx2(const Problem& p, const W* w, const X* bias, X* y, int64_t first, int64_t last) {
  rows_portable(p, w, bias, y, first, last);
}
void columns_avx2(const Problem& p, const float* w, float* acc, int64_t c0, int64_t c1) {
  columns_portable(p, w, acc, c0, c1);
}
#endif

// ---- the operator -------------------------------------------------------------------------------------------------

// Items (rows of W, or of the stored (k, n) matrix) per chunk of work: about `bytes` of weights, a multiple of `block`.
int64_t chunk_items(int64_t bytes, int64_t bytes_per_item, int64_t block) {
  const int64_t items = std::max<int64_t>(1, bytes / bytes_per_item);
  return (items + block - 1) / block * block;
}

// Runs work(index, begin, end) for the chunks [index * chunk, ...) of [0, n), which the threads take in turn from a
// shared counter: a thread that starts late (woken after the others) takes fewer chunks instead of making the others
// wait for its fixed share, as a static split would.
template <typename F>
void in_chunks(int64_t n, int64_t chunk, const F& work) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) work(c, c * chunk, std::min(n, (c + 1) * chunk));
  });
}

template <typename X, typename W>
void run_rows(const Problem& p, const W* w, const X* bias, X* y, bool avx2) {
  // each output is one thread's sum, whichever thread takes its chunk
  in_chunks(p.n, chunk_items(256 * 1024, p.k * sizeof(W), kRowBlock), [&](int64_t, int64_t first, int64_t last) {
    if (avx2) rows_avx2(p, w, bias, y, first, last);
    else rows_portable(p, w, bias, y, first, last);
  });
}

template <typename X>
void run(const Problem& p, const at::Tensor& weight, const X* bias, X* y, bool columns, bool avx2) {
  if (weight.scalar_type() == at::kChar) return run_rows(p, weight.const_data_ptr<int8_t>(), bias, y, avx2);
  if constexpr (std::is_same_v<X, float>) {
    if (columns) {
      // each chunk of the (k, n) matrix's rows is summed into partial sums of all of y: reads stay sequential
      // however narrow y is (splitting y's columns instead reads the matrix in strided pieces). The partials are
      // added in chunk order, so the result does not depend on which thread took which chunk.
      const int64_t chunk = chunk_items(1024 * 1024, p.n * sizeof(float), 4), size = p.m * p.n;
      std::vector<float> partial((p.k + chunk - 1) / chunk * size, 0.0f);
      const float* wp = weight.const_data_ptr<float>();
      in_chunks(p.k, chunk, [&](int64_t index, int64_t c0, int64_t c1) {
        if (avx2) columns_avx2(p, wp, partial.data() + index * size, c0, c1);
        else columns_portable(p, wp, partial.data() + index * size, c0, c1);
      });
      float* total = partial.data();  // the first chunk's partials, then the others added in order
      for (size_t at = size; at < partial.size(); at += size)
        for (int64_t e = 0; e < size; ++e) total[e] += partial[at + e];
      for (int64_t e = 0; e < size; ++e) store(y + e, bias, e % p.n, total[e]);
      return;
    }
  }
  run_rows(p, weight.const_data_ptr<X>(), bias, y, avx2);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& scale, bool portable) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "minhub::linear: float32 or bfloat16 activations, not ",
              dtype);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.is_contiguous(),
              "minhub::linear: contiguous CPU activations and a CPU weight");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "minhub::linear: x ", x.sizes(),
              " and a weight of ", weight.sizes(), " do not multiply");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k > 0, "minhub::linear: a weight with no input features (", weight.sizes(), ") has nothing to sum");
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight.scalar_type() == dtype, "minhub::linear: a ", weight.scalar_type(), " weight with ",
              dtype, " activations");
  TORCH_CHECK(int8 == scale.has_value(), "minhub::linear: int8 weights need their scales, other weights none");
  TORCH_CHECK(!int8 || ((scale->scalar_type() == at::kFloat || scale->scalar_type() == at::kBFloat16) &&
                         scale->is_contiguous() && scale->numel() == n),
              "minhub::linear: int8 scales are float32 or bfloat16, one per output row");
  TORCH_CHECK(!bias || (bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == n),
              "minhub::linear: the bias is contiguous, one per output row, in the activations' dtype");
  const bool rows = weight.stride(1) == 1 && (weight.stride(0) == k || n == 1);
  const bool columns = !rows && weight.stride(0) == 1 && weight.stride(1) == n && weight.scalar_type() == at::kFloat;
  TORCH_CHECK(rows || columns, "minhub::linear: the weight must be row-major (or in float32, a transposed row-major "
              "matrix); call .contiguous() on it");

  const int64_t m = x.numel() / k;
  std::vector<float> converted;  // bf16 activations in float32: a few kB
  const float* xf;
  if (dtype == at::kFloat) {
    xf = x.const_data_ptr<float>();
  } else {
    const c10::BFloat16* xb = x.const_data_ptr<c10::BFloat16>();
    converted.assign(xb, xb + m * k);
    xf = converted.data();
  }
  std::vector<float> scale_f;  // bf16 scales in float32
  const float* scales = nullptr;
  if (int8 && scale->scalar_type() == at::kFloat) {
    scales = scale->const_data_ptr<float>();
  } else if (int8) {
    const c10::BFloat16* sb = scale->const_data_ptr<c10::BFloat16>();
    scale_f.assign(sb, sb + n);
    scales = scale_f.data();
  }
  const Problem p{xf, m, k, n, scales};
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const bool avx2 = !portable && cpu_has_avx2();
  if (dtype == at::kFloat)
    run(p, weight, bias ? bias->const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), columns, avx2);
  else
    run(p, weight, bias ? bias->const_data_ptr<c10::BFloat16>() : nullptr, y.mutable_data_ptr<c10::BFloat16>(),
        columns, avx2);
  return y;
}

// ---- minhub::attend: attention for the one new query of a decode step -------------------------------------------
// y = softmax(scale * q . k_l over the L keys) weighted sum of the v_l, for each of the B x H heads. PyTorch's SDPA
// prepares blocks for many queries (135 us a layer for one bf16 query on a 2-core AVX2 CPU); this reads each key and
// value once. Sums in float32, key by key in order, 8 lanes at a time: the compiler vectorizes the loops below,
// for AVX2 in attend_avx2's copy.

template <typename T>
__attribute__((always_inline)) inline float dot8(const float* q, const T* k, int64_t d) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += q[c + j] * static_cast<float>(k[c + j]);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; c < d; ++c) sum += q[c] * static_cast<float>(k[c]);
  return sum;
}

struct Heads {  // q (B, H, 1, D), k and v (B, H / group, L, D) with any strides but the last; y (B, H, 1, D)
  int64_t heads_per_batch, group, L, D;  // query head h reads key/value head h / group (grouped-query attention)
  int64_t q_b, q_h, k_b, k_h, k_l, v_b, v_h, v_l;
  float scale;
};

template <typename T>
__attribute__((always_inline)) inline void attend_heads(const Heads& a, const T* q, const T* k, const T* v, T* y,
                                                        int64_t first, int64_t last) {
  std::vector<float> qf(a.D), scores(a.L), acc(a.D);
  for (int64_t bh = first; bh < last; ++bh) {
    const int64_t b = bh / a.heads_per_batch, h = bh % a.heads_per_batch;
    const T* qh = q + b * a.q_b + h * a.q_h;
    const T* kh = k + b * a.k_b + h / a.group * a.k_h;
    const T* vh = v + b * a.v_b + h / a.group * a.v_h;
    for (int64_t c = 0; c < a.D; ++c) qf[c] = static_cast<float>(qh[c]);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < a.L; ++l) {
      scores[l] = a.scale * dot8(qf.data(), kh + l * a.k_l, a.D);
      top = std::max(top, scores[l]);
    }
    float total = 0;
    for (int64_t l = 0; l < a.L; ++l) total += scores[l] = std::exp(scores[l] - top);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t l = 0; l < a.L; ++l) {
      const float p = scores[l];
      const T* vl = vh + l * a.v_l;
      for (int64_t c = 0; c < a.D; ++c) acc[c] += p * static_cast<float>(vl[c]);
    }
    for (int64_t c = 0; c < a.D; ++c) y[bh * a.D + c] = static_cast<T>(acc[c] / total);
  }
}

#if defined(__x86_64__)
template <typename T>
AVX2 void attend_avx2(const Heads& a, const T* q, const T* k, const T* v, T* y, int64_t first, int64_t last) {
  attend_heads(a, q, k, v, y, first, last);
}
#endif

template <typename T>
void attend_all(const Heads& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& y,
                int64_t heads, bool avx2) {
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  // heads in parallel once there is enough to read (about 8k keys' and as many values' elements per task)
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, a.L * a.D));
  at::parallel_for(0, heads, grain, [&](int64_t first, int64_t last) {
#if defined(__x86_64__)
    if (avx2) return attend_avx2(a, qp, kp, vp, yp, first, last);
#endif
    attend_heads(a, qp, kp, vp, yp, first, last);  // the portable loops
  });
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool portable) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "minhub::attend: float32 or bfloat16, not ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "minhub::attend: q, k and v in one dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "minhub::attend: CPU tensors");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "minhub::attend: one query, q of shape (B, H, 1, D), not ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0 && k.size(3) == q.size(3) && k.size(2) > 0,
              "minhub::attend: k and v of shape (B, H / group, L > 0, D) for q of ", q.sizes(), ", not ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "minhub::attend: the last dimension of q, k and v contiguous");
  const Heads a{q.size(1), q.size(1) / k.size(1), k.size(2), q.size(3), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), static_cast<float>(scale)};
  at::Tensor y = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  const bool avx2 = !portable && cpu_has_avx2();
  const int64_t heads = q.size(0) * q.size(1);
  if (dtype == at::kFloat) attend_all<float>(a, q, k, v, y, heads, avx2);
  else attend_all<c10::BFloat16>(a, q, k, v, y, heads, avx2);
  return y;
}

}  // namespace

TORCH_LIBRARY(minhub, m) {
  m.def("attend(Tensor q, Tensor k, Tensor v, float scale, bool portable=False) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale=None, bool portable=False) -> Tensor");
}
TORCH_LIBRARY_IMPL(minhub, CPU, m) {
  m.impl("linear", &linear);
  m.impl("attend", &attend);
}
