// Fused float32 CPU kernels for msfx's compiled steps, called through mindspore.ops.Custom(func_type="aot").
// MindSpore 2.10's aot signature: params holds the inputs then the outputs; return 0 on success.
// Built by msfx/kernels/__init__.py (g++ -O3 -march=native -fopenmp). The inference kernels run on
// MindSpore's calling thread: OpenMP threads spinning between them starved MindSpore's own (batch-8
// SmolLM2 decode 47 tok/s with a parallel attention and norm, 89 without; measured).
#include <cmath>
#include <cstdint>
#include <cstring>
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

// HF's rotate-half rotary over the first rd channels of one head (x * cos + rotate_half(x) * sin);
// the remaining channels pass through (partial rotary, GPT-NeoX / Phi).
void rotate(const float *x, const float *cos, const float *sin, int64_t rd, int64_t d, float *out) {
  const int64_t half = rd / 2;
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * cos[j] - x[j + half] * sin[j];
  for (int64_t j = half; j < rd; ++j) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
  for (int64_t j = rd; j < d; ++j) out[j] = x[j];
}

}  // namespace

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

// y = silu(gate) * up: gate, up [..., n] -> y like gate (Llama's SwiGLU product).
MSFX_KERNEL(MsfxSiluMul) {
  const float *g = static_cast<const float *>(params[0]), *u = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
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
