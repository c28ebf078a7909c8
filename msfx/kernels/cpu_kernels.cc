// Fused float32 CPU kernels for msfx's compiled steps, called through mindspore.ops.Custom(func_type="aot").
// MindSpore 2.10's aot signature: params holds the inputs then the outputs; return 0 on success.
// Built by msfx/kernels/__init__.py (g++ -O3 -march=native -fopenmp). The inference kernels run on
// MindSpore's calling thread, except the matrix products, which split rows over `Pool`'s workers:
// OpenMP's threads spin ~0.3 s between regions and starved MindSpore's own (batch-8 SmolLM2 decode
// 47 tok/s with a parallel attention and norm, 89 without; measured), the pool's spin ~50 µs.
#include <immintrin.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define MSFX_KERNEL(name) \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra)

namespace {

int64_t numel(int nd, const int64_t *s) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= s[i];
  return n;
}

float dot(const float *a, const float *b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// silu(g) * u, HF's SiLU as g / (1 + e^-g): MsfxSiluMul and the gated products share it.
inline float silu_times(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

// HF's rotate-half rotary over the first rd channels of one head (x * cos + rotate_half(x) * sin);
// the remaining channels pass through (partial rotary, GPT-NeoX / Phi).
void rotate(const float *x, const float *cos, const float *sin, int64_t rd, int64_t d, float *out) {
  const int64_t half = rd / 2;
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * cos[j] - x[j + half] * sin[j];
  for (int64_t j = half; j < rd; ++j) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
  for (int64_t j = rd; j < d; ++j) out[j] = x[j];
}

// Worker threads for one kernel call at a time: run(task) calls task(part, parts) for every part, part 0
// on the caller. Idle workers spin ~50 µs (the next product of a decode step is usually that close),
// then sleep on a futex. A caller finding the pool busy, or a forked child, runs all parts itself.
class Pool {
 public:
  using Task = void (*)(const void *ctx, int part, int parts);

  static Pool &get() {
    static Pool *pool = new Pool();  // never destroyed: its detached workers outlive static destructors
    return *pool;
  }

  void run(Task task, const void *ctx) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock() || getpid() != pid_ || workers_ == 0) return task(ctx, 0, 1);
    task_ = task;
    ctx_ = ctx;
    pending_.store(workers_);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) syscall(SYS_futex, &generation_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    task(ctx, 0, workers_ + 1);
    while (pending_.load(std::memory_order_acquire) > 0) __builtin_ia32_pause();
  }

 private:
  Pool() : pid_(getpid()) {
    cpu_set_t set;
    const int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    workers_ = std::min(cpus, 8) - 1;  // a matrix-vector product saturates memory well before 8 threads
    for (int i = 1; i <= workers_; ++i) std::thread(&Pool::work, this, i).detach();
  }

  void work(int part) {
    uint32_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        __builtin_ia32_pause();
        if (spins % 256 == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) {
          sleeping_.fetch_add(1);
          syscall(SYS_futex, &generation_, FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
          sleeping_.fetch_sub(1);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      task_(ctx_, part, workers_ + 1);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  const pid_t pid_;
  int workers_ = 0;
  std::mutex busy_;
  Task task_ = nullptr;
  const void *ctx_ = nullptr;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0}, sleeping_{0};
};

// GCC vectors of 16 lanes: AVX-512 registers here, pairs of AVX2 registers on older CPUs.
typedef float f16v __attribute__((vector_size(64)));
typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

// float32 -> nearest bfloat16 (even on ties), NaN kept quiet: torch's c10::BFloat16 conversion.
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t quiet = (b >> 16) | 0x40u, rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);  // no branch: loops vectorise
}

inline float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float r16(float f) { return from_bf16(to_bf16(f)); }

// Weight storage: float32, or raw bfloat16 / float16 bits widened exactly to float32 when loaded.
enum class Stored { f32, bf16, f16 };

template <Stored S>
float widen(const void *w, int64_t i) {
  if constexpr (S == Stored::f32) {
    return static_cast<const float *>(w)[i];
  } else if constexpr (S == Stored::bf16) {
    return from_bf16(static_cast<const uint16_t *>(w)[i]);
  } else {
    return static_cast<float>(static_cast<const _Float16 *>(w)[i]);
  }
}

template <Stored S>
f16v widen16(const void *w, int64_t i) {
  f16v v;
  if constexpr (S == Stored::f32) {
    std::memcpy(&v, static_cast<const float *>(w) + i, sizeof v);
  } else {
#ifdef __AVX512F__  // GCC's generic conversions scalarised these (3x slower float16 products; measured)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(w) + i));
    const __m512 f = S == Stored::bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                       : _mm512_cvtph_ps(h);
    std::memcpy(&v, &f, sizeof v);
#else
    for (int64_t j = 0; j < kLanes; ++j) v[j] = widen<S>(w, i + j);
#endif
  }
  return v;
}

float lanes_sum(f16v v) {  // a tree, not 15 dependent adds: the sums cost more than a short row's products
  f8v a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char *>(&v) + 32, 32);
  a += b;
  f4v c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char *>(&a) + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// Up to four matrices sharing one input x [m, k]: y[o] = x w[o]^T, w[o] [n[o], k]; or, `gated`, one output
// y[0] = silu(x w[0]^T) * (x w[1]^T) (Llama's gate and up products). One pool run for all of them: a decode
// layer's q, k and v products (or gate and up) cost one op instead of three.
struct Products {
  const float *x;
  const uint32_t *packed;  // bfloat16 inputs (x then bfloat16 too) packed for pair_part, or null
  const void *w[4];
  float *y[4];
  int64_t n[4];
  int count;
  int64_t m, k;
  bool gated;
};

// out[b * ld + a] = x row i + b . w row r + a, for a < R, b < M: each weight vector is loaded once for M inputs.
template <Stored S, int R, int M>
void product_tile(const float *x, const void *w, int64_t k, int64_t r, int64_t i, float *out, int64_t ld) {
  f16v acc[R][M] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    f16v wv[R];
    for (int a = 0; a < R; ++a) wv[a] = widen16<S>(w, (r + a) * k + j);
    for (int b = 0; b < M; ++b) {
      const f16v xv = widen16<Stored::f32>(x, (i + b) * k + j);
      for (int a = 0; a < R; ++a) acc[a][b] += wv[a] * xv;
    }
  }
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < M; ++b) {
      float s = lanes_sum(acc[a][b]);
      for (int64_t t = j; t < k; ++t) s += widen<S>(w, (r + a) * k + t) * x[(i + b) * k + t];
      out[b * ld + a] = s;
    }
}

// Weight rows r..r+R of output o, for all inputs: the gated form multiplies silu(gate) by up per tile, as
// MsfxSiluMul does (the same sums in the same order as two products then that kernel).
template <Stored S, int R, int M>
void tile(const Products &p, int o, int64_t r, int64_t i) {
  if (!p.gated) return product_tile<S, R, M>(p.x, p.w[o], p.k, r, i, p.y[o] + i * p.n[o] + r, p.n[o]);
  float g[M * R], u[M * R];
  product_tile<S, R, M>(p.x, p.w[0], p.k, r, i, g, R);
  product_tile<S, R, M>(p.x, p.w[1], p.k, r, i, u, R);
  for (int b = 0; b < M; ++b)
    for (int a = 0; a < R; ++a) p.y[0][(i + b) * p.n[0] + r + a] = silu_times(g[b * R + a], u[b * R + a]);
}

// Tiles of 8 weight rows x 3 inputs: 24 accumulators, within the 32 vector registers (batch-8 products 1.5x
// faster than 4 x 4 tiles; measured).
template <Stored S, int R>
void product_rows(const Products &p, int o, int64_t r) {
  int64_t i = 0;
  for (; i + 3 <= p.m; i += 3) tile<S, R, 3>(p, o, r, i);
  switch (p.m - i) {
    case 2: return tile<S, R, 2>(p, o, r, i);
    case 1: return tile<S, R, 1>(p, o, r, i);
  }
}

// Products of more than kDotRows rows (a prompt's) multiply panels of kPanel weight rows, packed k-major and
// widened to float32 as they are packed, by kPanelRows inputs at a time: each input element is broadcast against
// the panel's two vectors (16 accumulators, the form of BLIS's and MKL's kernels; a 37-row SmolLM2 product
// 1.75x faster than the dot-product tiles, measured). kDepth columns of k at a time keep a panel in L2.
constexpr int64_t kDotRows = 8, kPanel = 32, kPanelRows = 8, kDepth = 512;

#ifdef __AVX512F__
// Rows r[0..16) become columns: r[j][i] <- r[i][j].
void transpose16(__m512 *r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // u[4i + j] holds columns 4L + j of rows 4i..4i+3 in its 128-bit block L
    const __m512 v = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), w = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 v2 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD), w2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(v, w, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v, w, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(v2, w2, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v2, w2, 0xDD);
  }
}
#endif

// wp[t * kPanel + a] = w[r + a][t0 + t] widened, for t < kc; 0 for rows r + a >= n.
template <Stored S>
void pack_panel(const void *w, int64_t n, int64_t k, int64_t r, int64_t t0, int64_t kc, float *wp) {
  int64_t t = 0;
#ifdef __AVX512F__
  for (; t + kLanes <= kc; t += kLanes)
    for (int a0 = 0; a0 < kPanel; a0 += 16) {
      __m512 v[16];
      for (int a = 0; a < 16; ++a) {
        const f16v row = r + a0 + a < n ? widen16<S>(w, (r + a0 + a) * k + t0 + t) : f16v{};
        std::memcpy(&v[a], &row, sizeof row);
      }
      transpose16(v);
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(wp + (t + q) * kPanel + a0, v[q]);
    }
#endif
  for (; t < kc; ++t)
    for (int a = 0; a < kPanel; ++a) wp[t * kPanel + a] = r + a < n ? widen<S>(w, (r + a) * k + t0 + t) : 0.f;
}

// y[b][0..cols) (+)= x row b . panel columns, for M rows: the first depth block starts from 0, later ones add.
template <int M>
void panel_rows(const float *x, int64_t ldx, const float *wp, int64_t kc, float *y, int64_t ldy, int64_t cols,
                bool first) {
  f16v acc[M][2] = {};
  if (!first)
    for (int b = 0; b < M; ++b) std::memcpy(acc[b], y + b * ldy, cols * sizeof(float));
  for (int64_t t = 0; t < kc; ++t) {
    const f16v w0 = widen16<Stored::f32>(wp, t * kPanel), w1 = widen16<Stored::f32>(wp, t * kPanel + kLanes);
    for (int b = 0; b < M; ++b) {
      const f16v xv = f16v{} + x[b * ldx + t];
      acc[b][0] += xv * w0;
      acc[b][1] += xv * w1;
    }
  }
  for (int b = 0; b < M; ++b) std::memcpy(y + b * ldy, acc[b], cols * sizeof(float));
}

// out[i][0..cols) = x w[r..r+cols)^T for all m rows of x, out with leading dimension ldy.
template <Stored S>
void panel_product(const float *x, int64_t m, int64_t k, const void *w, int64_t n, int64_t r, float *out,
                   int64_t ldy, float *wp) {
  const int64_t cols = std::min(kPanel, n - r);
  for (int64_t t0 = 0; t0 < k; t0 += kDepth) {
    const int64_t kc = std::min(kDepth, k - t0);
    pack_panel<S>(w, n, k, r, t0, kc, wp);
    int64_t i = 0;
    for (; i + kPanelRows <= m; i += kPanelRows)
      panel_rows<kPanelRows>(x + i * k + t0, k, wp, kc, out + i * ldy, ldy, cols, t0 == 0);
    const float *xi = x + i * k + t0;
    float *yi = out + i * ldy;
    switch (m - i) {
      case 7: panel_rows<7>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 6: panel_rows<6>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 5: panel_rows<5>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 4: panel_rows<4>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 3: panel_rows<3>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 2: panel_rows<2>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
      case 1: panel_rows<1>(xi, k, wp, kc, yi, ldy, cols, t0 == 0); break;
    }
  }
}

// This part's share of all outputs' panels, the outputs' columns taken end to end (the gated form: gate and up
// panels into scratch rows, then silu(gate) * up, as MsfxSiluMul computes it).
template <Stored S>
void panel_part(const void *ctx, int part, int parts) {
  const Products &p = *static_cast<const Products *>(ctx);
  const int outputs = p.gated ? 1 : p.count;
  thread_local std::vector<float> scratch;
  scratch.resize(kPanel * kDepth + (p.gated ? 2 * p.m * kPanel : 0));
  float *wp = scratch.data(), *g = wp + kPanel * kDepth, *u = g + p.m * kPanel;
  int64_t panels = 0;
  for (int o = 0; o < outputs; ++o) panels += (p.n[o] + kPanel - 1) / kPanel;
  const int64_t t0 = panels * part / parts, t1 = panels * (part + 1) / parts;
  for (int64_t o = 0, first = 0; o < outputs; first += (p.n[o] + kPanel - 1) / kPanel, ++o) {
    const int64_t n = p.n[o], count = (n + kPanel - 1) / kPanel;
    for (int64_t t = std::max(t0 - first, int64_t{0}); t < std::min(t1 - first, count); ++t) {
      const int64_t r = t * kPanel;
      if (!p.gated) {
        panel_product<S>(p.x, p.m, p.k, p.w[o], n, r, p.y[o] + r, n, wp);
        continue;
      }
      panel_product<S>(p.x, p.m, p.k, p.w[0], n, r, g, kPanel, wp);
      panel_product<S>(p.x, p.m, p.k, p.w[1], n, r, u, kPanel, wp);
      for (int64_t i = 0; i < p.m; ++i)
        for (int64_t c = 0; c < std::min(kPanel, n - r); ++c)
          p.y[0][i * n + r + c] = silu_times(g[i * kPanel + c], u[i * kPanel + c]);
    }
  }
}

#ifdef __AVX512BF16__
// bfloat16 inputs times bfloat16 weights (HF's bfloat16 models, eager), with AVX512-BF16's pairwise dot product
// into float32 sums (the instructions of torch's bfloat16 products). The inputs are packed once per product, 16
// rows to a vector as pairs of k (xp[g][p][i] = x[16g + i][2p .. 2p + 1], zero past m); the weights are read in
// place, each pair broadcast against kGroups such vectors: every weight row is read once for 80 input rows. At
// 77 x 4096 x 10240 on 2 cores 364-383 GFLOPS, against 227-320 for weight panels packed per product (measured).
constexpr int kGroups = 5, kCols = 4;

// out[16 g + i][j + c] = sum_p xp[g][p][i] . w[j + c][pair p], for g < G groups from g0, c < Cn columns.
template <int G, int Cn>
void pair_tile(const uint32_t *xp, int64_t pairs, const uint16_t *w, int64_t k, float *out, int64_t n, int64_t m,
               int64_t g0, int64_t j) {
  __m512 acc[G][Cn];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < Cn; ++c) acc[g][c] = _mm512_setzero_ps();
  const uint32_t *rows[Cn];
  for (int c = 0; c < Cn; ++c) rows[c] = reinterpret_cast<const uint32_t *>(w + (j + c) * k);
  const uint32_t *xg = xp + g0 * pairs * kLanes;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh xv[G];
    for (int g = 0; g < G; ++g) xv[g] = (__m512bh)_mm512_loadu_si512(xg + (g * pairs + p) * kLanes);
    for (int c = 0; c < Cn; ++c) {
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(static_cast<int>(rows[c][p]));
      for (int g = 0; g < G; ++g) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], xv[g], wv);
    }
  }
  alignas(64) float lanes[kLanes];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < Cn; ++c) {
      _mm512_store_ps(lanes, acc[g][c]);
      for (int64_t i = 0, row = (g0 + g) * kLanes; i < kLanes && row < m; ++i, ++row) out[row * n + j + c] = lanes[i];
    }
}

template <int G>
void pair_columns(const Products &p, const uint32_t *xp, int o, int64_t g0, int64_t c0, int64_t c1) {
  const int64_t pairs = p.k / 2, n = p.n[o];
  const uint16_t *w = static_cast<const uint16_t *>(p.w[o]);
  int64_t j = c0;
  for (; j + kCols <= c1; j += kCols) pair_tile<G, kCols>(xp, pairs, w, p.k, p.y[o], n, p.m, g0, j);
  for (; j < c1; ++j) pair_tile<G, 1>(xp, pairs, w, p.k, p.y[o], n, p.m, g0, j);
}

// This part's share of all outputs' columns (the outputs taken end to end), for every group of input rows.
void pair_part(const void *ctx, int part, int parts) {
  const Products &p = *static_cast<const Products *>(ctx);
  int64_t total = 0;
  for (int o = 0; o < p.count; ++o) total += p.n[o];
  const int64_t t0 = total * part / parts / kCols * kCols;
  const int64_t t1 = part + 1 == parts ? total : total * (part + 1) / parts / kCols * kCols;
  const int64_t groups = (p.m + kLanes - 1) / kLanes;
  for (int64_t g0 = 0; g0 < groups; g0 += kGroups)
    for (int64_t o = 0, first = 0; o < p.count; first += p.n[o], ++o) {
      const int64_t c0 = std::max(t0 - first, int64_t{0}), c1 = std::min(t1 - first, p.n[o]);
      if (c0 >= c1) continue;
      switch (std::min<int64_t>(groups - g0, kGroups)) {
        case 5: pair_columns<5>(p, p.packed, o, g0, c0, c1); break;
        case 4: pair_columns<4>(p, p.packed, o, g0, c0, c1); break;
        case 3: pair_columns<3>(p, p.packed, o, g0, c0, c1); break;
        case 2: pair_columns<2>(p, p.packed, o, g0, c0, c1); break;
        case 1: pair_columns<1>(p, p.packed, o, g0, c0, c1); break;
      }
    }
}

// x [m, k] bfloat16 -> the pair layout pair_tile reads.
void pack_inputs(const uint16_t *x, int64_t m, int64_t k, std::vector<uint32_t> &xp) {
  const int64_t pairs = k / 2, groups = (m + kLanes - 1) / kLanes;
  xp.assign(groups * pairs * kLanes, 0u);
  for (int64_t row = 0; row < m; ++row) {
    uint32_t *dst = xp.data() + (row / kLanes) * pairs * kLanes + row % kLanes;
    const uint16_t *src = x + row * k;
    for (int64_t q = 0; q < pairs; ++q) std::memcpy(dst + q * kLanes, src + 2 * q, 4);
  }
}
#endif

// This part's share of all outputs' tiles of 8 weight rows, the outputs' columns taken end to end.
template <Stored S>
void product_part(const void *ctx, int part, int parts) {
  const Products &p = *static_cast<const Products *>(ctx);
  const int outputs = p.gated ? 1 : p.count;
  int64_t tiles = 0;
  for (int o = 0; o < outputs; ++o) tiles += (p.n[o] + 7) / 8;
  const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
  for (int64_t o = 0, first = 0; o < outputs; first += (p.n[o] + 7) / 8, ++o) {
    const int64_t n = p.n[o], a = std::max(t0 - first, int64_t{0}), b = std::min(t1 - first, (n + 7) / 8);
    for (int64_t t = a; t < b; ++t) {
      int64_t r = t * 8;
      if (r + 8 <= n) {
        product_rows<S, 8>(p, o, r);
      } else {
        for (; r < n; ++r) product_rows<S, 1>(p, o, r);
      }
    }
  }
}

// MindSpore's dtype name of a weight -> its storage; -1 if none of the three.
int stored(const char *dtype) {
  const std::string name(dtype);
  return name == "float32" ? 0 : name == "bfloat16" ? 1 : name == "float16" ? 2 : -1;
}

// Checks the shapes and dtypes (x float32 [m, k]; weights 2-D [n, k], one storage) and runs the products.
int run_products(Products &p, int *ndims, int64_t **shapes, const char **dtypes) {
  const std::string input(dtypes[0]);
  if (ndims[0] != 2 || (input != "float32" && input != "bfloat16")) return 1;
  p.m = shapes[0][0];
  p.k = shapes[0][1];
  const int kind = stored(dtypes[1]);
  for (int o = 0; o < p.count; ++o) {
    if (ndims[1 + o] != 2 || shapes[1 + o][1] != p.k || stored(dtypes[1 + o]) != kind) return 1;
    p.n[o] = shapes[1 + o][0];
  }
  if (kind < 0 || (p.gated && p.n[1] != p.n[0])) return 1;
  if (input == "bfloat16") {
#ifdef __AVX512BF16__
    if (kind != 1 || p.gated || p.k % 2 != 0) return 1;
    thread_local std::vector<uint32_t> packed;
    pack_inputs(reinterpret_cast<const uint16_t *>(p.x), p.m, p.k, packed);
    p.packed = packed.data();
    Pool::get().run(pair_part, &p);
    return 0;
#else
    return 1;
#endif
  }
  static const Pool::Task dots[] = {product_part<Stored::f32>, product_part<Stored::bf16>, product_part<Stored::f16>};
  static const Pool::Task panels[] = {panel_part<Stored::f32>, panel_part<Stored::bf16>, panel_part<Stored::f16>};
  Pool::get().run(p.m > kDotRows ? panels[kind] : dots[kind], &p);
  return 0;
}

}  // namespace

// y[o] = x w[o]^T over the pool's threads (dot-product tiles for up to kDotRows rows, panels for more): x [m, k]
// float32; one to four weights [n[o], k] in float32, bfloat16 or float16 (widened exactly) -> one float32
// y [m, n[o]] each (torch.nn.functional.linear without bias). Inputs x, w[0..count), then the outputs. Where the
// CPU has AVX512-BF16 (msfx_bf16_dot), x may be bfloat16 with bfloat16 weights and even k (pair_part).
MSFX_KERNEL(MsfxLinear) {
  Products p{};
  p.count = (nparam - 1) / 2;
  if (p.count < 1 || p.count > 4 || nparam != 1 + 2 * p.count) return 1;
  p.x = static_cast<const float *>(params[0]);
  for (int o = 0; o < p.count; ++o) {
    p.w[o] = params[1 + o];
    p.y[o] = static_cast<float *>(params[1 + p.count + o]);
  }
  return run_products(p, ndims, shapes, dtypes);
}

// y = silu(x gate^T) * (x up^T): x [m, k] float32, gate and up [n, k] in one of the three storages -> y [m, n]
// float32 (Llama's MLP before down_proj).
MSFX_KERNEL(MsfxGatedLinear) {
  if (nparam != 4) return 1;
  Products p{};
  p.count = 2;
  p.gated = true;
  p.x = static_cast<const float *>(params[0]);
  p.w[0] = params[1];
  p.w[1] = params[2];
  p.y[0] = static_cast<float *>(params[3]);
  return run_products(p, ndims, shapes, dtypes);
}

// Rows of a table, widened to float32: ids [n] int32 or int64, table [vocab, h] float32, bfloat16 or float16
// -> [n, h] float32 (torch.nn.functional.embedding). An id outside [0, vocab) fails the op.
MSFX_KERNEL(MsfxEmbedding) {
  const int64_t n = numel(ndims[0], shapes[0]), vocab = shapes[1][0], h = shapes[1][1];
  const bool wide = std::string(dtypes[0]) == "int64";
  const int kind = stored(dtypes[1]);
  float *out = static_cast<float *>(params[2]);
  if (kind < 0) return 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = wide ? static_cast<const int64_t *>(params[0])[i] : static_cast<const int32_t *>(params[0])[i];
    if (id < 0 || id >= vocab) return 1;
    for (int64_t j = 0; j < h; ++j)
      out[i * h + j] = kind == 0   ? widen<Stored::f32>(params[1], id * h + j)
                       : kind == 1 ? widen<Stored::bf16>(params[1], id * h + j)
                                   : widen<Stored::f16>(params[1], id * h + j);
  }
  return 0;
}

// e^x in double for |x| <= 700 (to ~1e-15): 2^k e^r, |r| <= ln2 / 2, e^r by its Taylor series to r^13 (next term
// < 1e-17). Plain arithmetic, so the loops below vectorise; glibc's expf / tanhf do not (gelu_new 29 ms -> ~2 ms for
// 77 x 10240 values; measured).
static inline double exp_double(double x) {
  x = std::min(std::max(x, -700.0), 700.0);
  const double k = (x * 1.4426950408889634 + 0x1.8p52) - 0x1.8p52;  // round to nearest, inline (no libm call)
  const double r = (x - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  double p = 1.0 / 6227020800;
  p = p * r + 1.0 / 479001600;
  p = p * r + 1.0 / 39916800;
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(k) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, 8);
  return p * scale;
}

// tanh in double (x - x^3/3 below 1e-4, where (e^2x - 1) / (e^2x + 1) would cancel), then float.
static inline float tanh_float(float x) {
  const double a = std::min(std::fabs(static_cast<double>(x)), 20.0), e = exp_double(2.0 * a);
  const double t = a < 1e-4 ? a - a * a * a / 3.0 : (e - 1.0) / (e + 1.0);
  return static_cast<float>(x < 0 ? -t : t);
}

// HF's op-by-op activations on bfloat16 x [any], rounding to bfloat16 after each op as torch's bfloat16 run does
// (msfx.layers.basic._STEPWISE): kind [1] int32, 0 NewGELUActivation (gelu_new), 1 QuickGELUActivation. y like x.
MSFX_KERNEL(MsfxStepwiseActivation) {
  const int64_t n = numel(ndims[0], shapes[0]);
  const uint16_t *x = static_cast<const uint16_t *>(params[0]);
  const int kind = *static_cast<const int32_t *>(params[1]);
  uint16_t *y = static_cast<uint16_t *>(params[2]);
  if (std::string(dtypes[0]) != "bfloat16" || kind < 0 || kind > 1) return 1;
  const float c = static_cast<float>(std::sqrt(2.0 / M_PI));
  if (kind == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = from_bf16(x[i]), z = r16(1.702f * v);
      const float s = r16(static_cast<float>(1.0 / (1.0 + exp_double(-static_cast<double>(z)))));
      y[i] = to_bf16(v * s);
    }
    return 0;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = from_bf16(x[i]);
    const float cube = r16(r16(v * v) * v);  // torch.pow(x, 3.0) multiplies twice
    const float inner = r16(c * r16(v + r16(0.044715f * cube)));
    y[i] = to_bf16(r16(0.5f * v) * r16(1.0f + r16(tanh_float(inner))));
  }
  return 0;
}

// y = x in the other of float32 and bfloat16, any shape (torch's conversions: bfloat16 widened exactly; float32
// rounded to nearest even, NaN kept quiet). MindSpore 2.10's CPU Cast took 4 ms for 77 x 10240 bfloat16 values.
MSFX_KERNEL(MsfxCast) {
  const int64_t n = numel(ndims[0], shapes[0]);
  const std::string from(dtypes[0]), to(dtypes[1]);
  if (from == "bfloat16" && to == "float32") {
    const uint16_t *x = static_cast<const uint16_t *>(params[0]);
    uint32_t *y = static_cast<uint32_t *>(params[1]);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<uint32_t>(x[i]) << 16;
    return 0;
  }
  if (from != "float32" || to != "bfloat16") return 1;
  const float *x = static_cast<const float *>(params[0]);
  uint16_t *y = static_cast<uint16_t *>(params[1]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = to_bf16(x[i]);
  return 0;
}

// y = weight * (x * rsqrt(mean(x^2) + eps)): x [..., h], weight [h], eps [1] -> y like x (HF LlamaRMSNorm).
MSFX_KERNEL(MsfxRmsNorm) {
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t h = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / h;
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * h;
    float *yr = y + r * h;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, h) / static_cast<float>(h) + eps);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
  return 0;
}

// y = weight * bf16(x * rsqrt(mean(x^2) + eps)) rounded to bfloat16: x [..., h] float32 or bfloat16, weight [h]
// bfloat16, eps [1] -> y bfloat16 like x (HF's LlamaRMSNorm / T5LayerNorm in a bfloat16 model, torch's roundings).
MSFX_KERNEL(MsfxRmsNormBf16) {
  const bool wide = std::string(dtypes[0]) == "float32";
  if ((!wide && std::string(dtypes[0]) != "bfloat16") || std::string(dtypes[1]) != "bfloat16") return 1;
  const uint16_t *w = static_cast<const uint16_t *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  uint16_t *y = static_cast<uint16_t *>(params[3]);
  const int64_t h = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / h;
  std::vector<float> row(h);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < h; ++i)
      row[i] = wide ? static_cast<const float *>(params[0])[r * h + i]
                    : from_bf16(static_cast<const uint16_t *>(params[0])[r * h + i]);
    const float inv = 1.0f / std::sqrt(dot(row.data(), row.data(), h) / static_cast<float>(h) + eps);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) y[r * h + i] = to_bf16(from_bf16(w[i]) * r16(row[i] * inv));
  }
  return 0;
}

// torch.nn.LayerNorm of a bfloat16 model: x [..., h] bfloat16, weight and bias [h] bfloat16, eps [1] -> y bfloat16
// like x; the mean, variance, scale and shift in float32, rounded once (as torch's CPU kernel).
MSFX_KERNEL(MsfxLayerNormBf16) {
  for (int i = 0; i < 3; ++i)
    if (std::string(dtypes[i]) != "bfloat16") return 1;
  const uint16_t *x = static_cast<const uint16_t *>(params[0]), *w = static_cast<const uint16_t *>(params[1]);
  const uint16_t *b = static_cast<const uint16_t *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  uint16_t *y = static_cast<uint16_t *>(params[4]);
  const int64_t h = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / h;
  std::vector<float> row(h);
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.f;
    for (int64_t i = 0; i < h; ++i) sum += row[i] = from_bf16(x[r * h + i]);
    const float mean = sum / static_cast<float>(h);
    float squares = 0.f;
    for (int64_t i = 0; i < h; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(h) + eps);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) y[r * h + i] = to_bf16((row[i] - mean) * inv * from_bf16(w[i]) + from_bf16(b[i]));
  }
  return 0;
}

// y = silu(gate) * up: gate, up [..., n] -> y like gate (Llama's SwiGLU product).
MSFX_KERNEL(MsfxSiluMul) {
  const float *g = static_cast<const float *>(params[0]), *u = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  for (int64_t i = 0; i < n; ++i) y[i] = silu_times(g[i], u[i]);
  return 0;
}

// Rotary on q and k, then k and v written into copies of the cache.
// Inputs: q [b*s, heads*d], k and v [b*s, kv*d], cos and sin [b, 1, s, rd], key and value caches
// [b, kv, slots, d], cache_position [s] int32. Outputs: q [b, heads, s, d] rotated, the two caches.
MSFX_KERNEL(MsfxRopeCacheWrite) {
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *cos = static_cast<const float *>(params[3]), *sin = static_cast<const float *>(params[4]);
  const float *kc = static_cast<const float *>(params[5]), *vc = static_cast<const float *>(params[6]);
  const int32_t *pos = static_cast<const int32_t *>(params[7]);
  float *qo = static_cast<float *>(params[8]), *ko = static_cast<float *>(params[9]);
  float *vo = static_cast<float *>(params[10]);
  const int64_t b = shapes[3][0], s = shapes[3][2], rd = shapes[3][3];
  const int64_t kv = shapes[5][1], slots = shapes[5][2], d = shapes[5][3];
  const int64_t heads = shapes[0][1] / d;
  for (int64_t i = 0; i < s; ++i)
    if (pos[i] < 0 || pos[i] >= slots) return 1;
  const int64_t cache = b * kv * slots * d;
  std::memcpy(ko, kc, cache * sizeof(float));
  std::memcpy(vo, vc, cache * sizeof(float));
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t si = 0; si < s; ++si) {
      const int64_t row = bi * s + si;
      const float *c = cos + row * rd, *sn = sin + row * rd;
      for (int64_t h = 0; h < heads; ++h)
        rotate(q + (row * heads + h) * d, c, sn, rd, d, qo + ((bi * heads + h) * s + si) * d);
      for (int64_t h = 0; h < kv; ++h) {
        const int64_t slot = ((bi * kv + h) * slots + pos[si]) * d;
        rotate(k + (row * kv + h) * d, c, sn, rd, d, ko + slot);
        std::memcpy(vo + slot, v + (row * kv + h) * d, d * sizeof(float));
      }
    }
  return 0;
}

// softmax(q k^T * scale + bias) v over a cache, grouped-query heads (query head h reads kv head
// h / (heads / kv)), as HF's eager attention in float32.
// Inputs: q [b, heads, s, d], keys and values [b, kv, slots, d], bias [b or 1, 1, 1, s or 1, slots]
// float32 (0 or the float32 minimum), scale [1]. Output: [b * s, heads * d], token-major.
// Keys whose bias is the float32 minimum are skipped (exp underflows to exactly 0 there) unless a
// row masks every key, which then averages them as HF does.
MSFX_KERNEL(MsfxCacheAttention) {
  const float *q = static_cast<const float *>(params[0]), *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]), *bias = static_cast<const float *>(params[3]);
  const float scale = *static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  const int64_t b = shapes[0][0], heads = shapes[0][1], s = shapes[0][2], d = shapes[0][3];
  const int64_t kv = shapes[1][1], slots = shapes[1][2];
  const int nb = ndims[3];
  const int64_t bias_rows = shapes[3][nb - 2];
  const int64_t bias_batch = shapes[3][0] == 1 ? 0 : bias_rows * slots;
  const int64_t groups = heads / kv;
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<float> score(slots);
      const float *keys = kc + (bi * kv + h / groups) * slots * d;
      const float *values = vc + (bi * kv + h / groups) * slots * d;
      for (int64_t si = 0; si < s; ++si) {
        const float *qr = q + ((bi * heads + h) * s + si) * d;
        const float *br = bias + bi * bias_batch + (bias_rows == 1 ? 0 : si * slots);
        bool any = false;
        for (int64_t t = 0; t < slots; ++t) any = any || br[t] > -1e38f;
        float top = -INFINITY;
        for (int64_t t = 0; t < slots; ++t) {
          if (any && br[t] <= -1e38f) continue;
          score[t] = dot(qr, keys + t * d, d) * scale + br[t];
          top = std::max(top, score[t]);
        }
        float total = 0.f;
        float *o = out + (bi * s + si) * heads * d + h * d;
        std::memset(o, 0, d * sizeof(float));
        for (int64_t t = 0; t < slots; ++t) {
          if (any && br[t] <= -1e38f) continue;
          const float p = std::exp(score[t] - top);
          total += p;
          const float *vr = values + t * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) o[j] += p * vr[j];
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] *= inv;
      }
    }
  return 0;
}

// One leaf's AdamW step, functional, in the arithmetic order of msfx.train.optim.AdamW.update (torch's
// single-tensor AdamW): g *= clip; p *= shrink; m += (g - m) * (1 - b1); v = v * b2 + g * g * (1 - b2);
// p -= step_size * (m / (sqrt(v) / bc2_sqrt + eps)). Inputs: p, g, m, v float32 of one shape, scalars [8] =
// step_size, bc2_sqrt, shrink, clip, 1 - b1, b2, 1 - b2, eps. Outputs: p, m, v. Contraction into FMAs is off
// so that each product rounds to float32 as the separate ops do: both paths agree bit for bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
MSFX_KERNEL(MsfxAdamW) {
  const float *p = static_cast<const float *>(params[0]), *g = static_cast<const float *>(params[1]);
  const float *m = static_cast<const float *>(params[2]), *v = static_cast<const float *>(params[3]);
  const float *s = static_cast<const float *>(params[4]);
  float *po = static_cast<float *>(params[5]), *mo = static_cast<float *>(params[6]);
  float *vo = static_cast<float *>(params[7]);
  const float step_size = s[0], bc2_sqrt = s[1], shrink = s[2], clip = s[3], c1 = s[4], b2 = s[5], c2 = s[6];
  const float eps = s[7];
  const int64_t n = numel(ndims[0], shapes[0]);
#pragma omp parallel for simd schedule(static) if (n >= 32768)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * clip;
    const float mi = m[i] + (gi - m[i]) * c1;
    const float vi = v[i] * b2 + gi * gi * c2;
    const float denom = __builtin_sqrtf(vi) / bc2_sqrt + eps;
    po[i] = p[i] * shrink - step_size * (mi / denom);
    mo[i] = mi;
    vo[i] = vi;
  }
  return 0;
}
#pragma GCC pop_options

// Sums of squares of k float32 tensors (any shapes) in one pass each, accumulated in double: inputs the
// tensors, output [k] float32 (clip_grad_norm_'s per-tensor squared norms).
MSFX_KERNEL(MsfxSumSquares) {
  const int k = nparam - 1;
  float *out = static_cast<float *>(params[k]);
  for (int t = 0; t < k; ++t) {
    const float *g = static_cast<const float *>(params[t]);
    const int64_t n = numel(ndims[t], shapes[t]);
    double s = 0.0;
#pragma omp parallel for simd reduction(+ : s) schedule(static) if (n >= 32768)
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    out[t] = static_cast<float>(s);
  }
  return 0;
}

// 1 where bfloat16 inputs are accepted by MsfxLinear (built for a CPU with AVX512-BF16), else 0.
extern "C" int msfx_bf16_dot() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}
