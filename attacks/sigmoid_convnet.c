/* DLG's gradient-matching objective and its gradient for a sigmoid conv net, one lane at a time
 * (see sigmoid_convnet.py for the model form and the derivation).
 *
 * Built twice by attacks/native.py, with REAL = float and REAL = double. Lanes are independent
 * (split over OpenMP threads): a lane's result never depends on the others or on the thread count.
 * Every convolution is a product with an unfolded input ("im2col"), [Co, Ci K K] x [Ci K K, P].
 */
#include <math.h>
#include <tgmath.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int thread_id(void) { return 0; }
#endif

#ifndef REAL
#define REAL float
#endif

/* Denormal numbers (below 1.2e-38 in float32) cost a microcode assist per operation on x86, and a
 * saturated sigmoid makes many (s = 1 / (1 + e^-z) for z < -87, and s (1 - s), and their products):
 * early DLG iterates made the kernel 20 % slower. Each lane runs with them flushed to zero (FTZ,
 * DAZ), which changes no sum of normal-sized terms; the caller's setting is restored. */
#if defined(__SSE2__)
#include <xmmintrin.h>
static unsigned flush_denormals(void) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040); /* FTZ | DAZ */
  return csr;
}
static void restore_denormals(unsigned csr) { _mm_setcsr(csr); }
#else
static unsigned flush_denormals(void) { return 0; }
static void restore_denormals(unsigned csr) { (void)csr; }
#endif
#define VEC (64 / (int)sizeof(REAL)) /* elements per AVX-512 register */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define IS_float 1
#if defined(__AVX512F__) && CAT(IS_, REAL)
#include <immintrin.h>
#define FAST 1
#else
#define FAST 0
#endif

/* C[M, N] (+)= A[M, K] B[K, N]; A[r, k] at A[r * ar + k * ak] (A or its transpose); B and C dense. */
static void gemm_plain(int64_t M, int64_t K, int64_t N, const REAL *A, int64_t ar, int64_t ak, const REAL *B,
                       REAL *C, int accumulate) {
  for (int64_t r = 0; r < M; r++) {
    REAL *c = C + r * N;
    if (!accumulate) memset(c, 0, (size_t)N * sizeof(REAL));
    for (int64_t k = 0; k < K; k++) {
      const REAL a = A[r * ar + k * ak], *b = B + k * N;
      for (int64_t j = 0; j < N; j++) c[j] += a * b[j];
    }
  }
}

#if FAST
/* A block of RB rows and NV vectors of 16 columns (the last one masked) of C, in registers. */
#define BLOCK(RB, NV)                                                                                        \
  static inline void block_##RB##x##NV(int64_t K, const float *A, int64_t ar, int64_t ak, const float *B,    \
                                       int64_t N, float *C, __mmask16 last, int accumulate) {                \
    __m512 acc[RB][NV];                                                                                      \
    _Pragma("GCC unroll 16") for (int r = 0; r < RB; r++)                                                    \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                                                   \
        acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xFFFF, C + r * N + 16 * v)      \
                               : _mm512_setzero_ps();                                                        \
    for (int64_t k = 0; k < K; k++) {                                                                        \
      __m512 b[NV];                                                                                          \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                                                   \
        b[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xFFFF, B + k * N + 16 * v);                       \
      _Pragma("GCC unroll 16") for (int r = 0; r < RB; r++) {                                                \
        const __m512 a = _mm512_set1_ps(A[r * ar + k * ak]);                                                 \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]); \
      }                                                                                                      \
    }                                                                                                        \
    _Pragma("GCC unroll 16") for (int r = 0; r < RB; r++)                                                    \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                                                   \
        _mm512_mask_storeu_ps(C + r * N + 16 * v, v == NV - 1 ? last : 0xFFFF, acc[r][v]);                   \
  }
BLOCK(4, 4)
BLOCK(1, 4)
BLOCK(16, 1)
BLOCK(8, 1)
BLOCK(4, 1)
BLOCK(1, 1)
#endif

static void gemm(int64_t M, int64_t K, int64_t N, const REAL *A, int64_t ar, int64_t ak, const REAL *B, REAL *C,
                 int accumulate) {
#if FAST
  if (N % 64 == 0) { /* blocks of 4 rows x 64 columns */
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) block_4x4(K, A + r * ar, ar, ak, B + n0, N, C + r * N + n0, 0xFFFF, accumulate);
      for (; r < M; r++) block_1x4(K, A + r * ar, ar, ak, B + n0, N, C + r * N + n0, 0xFFFF, accumulate);
    }
    return;
  }
  if (N <= 16) { /* blocks of 16 rows x N columns */
    const __mmask16 last = (__mmask16)((1u << N) - 1);
    int64_t r = 0;
    for (; r + 16 <= M; r += 16) block_16x1(K, A + r * ar, ar, ak, B, N, C + r * N, last, accumulate);
    for (; r + 8 <= M; r += 8) block_8x1(K, A + r * ar, ar, ak, B, N, C + r * N, last, accumulate);
    for (; r + 4 <= M; r += 4) block_4x1(K, A + r * ar, ar, ak, B, N, C + r * N, last, accumulate);
    for (; r < M; r++) block_1x1(K, A + r * ar, ar, ak, B, N, C + r * N, last, accumulate);
    return;
  }
#endif
  gemm_plain(M, K, N, A, ar, ak, B, C, accumulate);
}

typedef struct {
  int64_t ci, co, k, stride, pad, h, w, ho, wo;
} Conv;

static int64_t padded_size(const Conv *L) { return L->ci * (L->h + 2 * L->pad) * (L->w + 2 * L->pad); }

/* o[x] = src[x s] for x < n. */
static inline void gather(REAL *o, const REAL *src, int64_t n, int64_t s) {
#if FAST
  if (n <= 16 && s == 1) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(o, m, _mm512_maskz_loadu_ps(m, src));
    return;
  }
  if (n <= 16 && s == 2) { /* the even elements of src[0, 2n - 1) */
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const int64_t len = 2 * n - 1;
    const __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << (len < 16 ? len : 16)) - 1), src);
    const __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(len > 16 ? (1u << (len - 16)) - 1 : 0), src + 16);
    _mm512_mask_storeu_ps(o, (__mmask16)((1u << n) - 1), _mm512_permutex2var_ps(lo, even, hi));
    return;
  }
#endif
  for (int64_t x = 0; x < n; x++) o[x] = src[x * s];
}

/* o[x] = a[x s], o[n + x] = b[x s] for x < n <= 8: two output rows of im2col in one store. s = 1, or
 * s = 2 with idx = pair_index(n). */
#if FAST
static __m512i pair_index(int64_t n) {
  int32_t id[16] = {0};
  for (int64_t x = 0; x < n; x++) id[x] = (int32_t)(2 * x), id[n + x] = (int32_t)(16 + 2 * x);
  return _mm512_loadu_si512(id);
}

static inline void gather_pair(REAL *o, const REAL *a, const REAL *b, int64_t n, int64_t s, __m512i idx) {
  const __mmask16 first = (__mmask16)((1u << n) - 1), both = (__mmask16)((1u << (2 * n)) - 1);
  if (s == 1) { /* lane n + x reads (b - n)[n + x] */
    _mm512_mask_storeu_ps(o, both, _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(first, a), both & ~first, b - n));
  } else {
    const __mmask16 len = (__mmask16)((1u << (2 * n - 1)) - 1);
    _mm512_mask_storeu_ps(o, both, _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(len, a), idx,
                                                          _mm512_maskz_loadu_ps(len, b)));
  }
}
#endif

/* col[(c, i, j), (y, x)] = in[c, y s + i - p, x s + j - p], 0 outside; pad: padded_size scratch. */
static void im2col(const Conv *L, const REAL *in, REAL *col, REAL *pad) {
  const int64_t P = L->ho * L->wo, S = L->stride, hp = L->h + 2 * L->pad, wp = L->w + 2 * L->pad;
  memset(pad, 0, (size_t)padded_size(L) * sizeof(REAL));
  for (int64_t c = 0; c < L->ci; c++)
    for (int64_t y = 0; y < L->h; y++)
      memcpy(pad + (c * hp + y + L->pad) * wp + L->pad, in + (c * L->h + y) * L->w, (size_t)L->w * sizeof(REAL));
#if FAST
  const int pairs = L->wo <= 8 && (S == 1 || S == 2);
  const __m512i idx = pair_index(pairs ? L->wo : 1);
#endif
  for (int64_t c = 0; c < L->ci; c++)
    for (int64_t i = 0; i < L->k; i++)
      for (int64_t j = 0; j < L->k; j++) {
        REAL *row = col + ((c * L->k + i) * L->k + j) * P;
        int64_t y = 0;
#if FAST
        if (pairs) /* two rows per store: half the stores for 8-wide outputs */
          for (; y + 2 <= L->ho; y += 2)
            gather_pair(row + y * L->wo, pad + (c * hp + y * S + i) * wp + j, pad + (c * hp + (y + 1) * S + i) * wp + j,
                        L->wo, S, idx);
#endif
        for (; y < L->ho; y++) gather(row + y * L->wo, pad + (c * hp + y * S + i) * wp + j, L->wo, S);
      }
}

/* out[c, y s + i - p, x s + j - p] += col[(c, i, j), (y, x)]: the adjoint of im2col. */
static void col2im_plain(const Conv *L, const REAL *col, REAL *out) {
  const int64_t P = L->ho * L->wo, S = L->stride;
  for (int64_t c = 0; c < L->ci; c++)
    for (int64_t i = 0; i < L->k; i++)
      for (int64_t j = 0; j < L->k; j++) {
        const REAL *row = col + ((c * L->k + i) * L->k + j) * P;
        for (int64_t y = 0; y < L->ho; y++) {
          const int64_t iy = y * S + i - L->pad;
          if (iy < 0 || iy >= L->h) continue;
          for (int64_t x = 0; x < L->wo; x++) {
            const int64_t ix = x * S + j - L->pad;
            if (ix >= 0 && ix < L->w) out[(c * L->h + iy) * L->w + ix] += row[y * L->wo + x];
          }
        }
      }
}

#if FAST
/* The rows of out for col2im below, with the stride S and the vectors per row nv (1 or 2)
 * constants: the accumulators stay in registers (indexed by a variable, they went through the
 * stack, a store and a load in every addition's dependency chain). */
static inline __attribute__((always_inline)) void col2im_rows(const Conv *L, const REAL *col, REAL *out,
                                                              const int S, const int nv, __m512i idx[8][2],
                                                              __mmask16 m[8][2]) {
  const int64_t K = L->k, p = L->pad, w = L->w, wo = L->wo, P = L->ho * wo;
  const __mmask16 in_row = (__mmask16)((1u << wo) - 1);
  for (int64_t c = 0; c < L->ci; c++)
    for (int64_t iy = 0; iy < L->h; iy++) {
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t i = 0; i < K; i++) {
        const int64_t q = iy - i + p;
        if (q < 0 || q % S || q / S >= L->ho) continue;
        const REAL *rows = col + (c * K + i) * K * P + (q / S) * wo;
        for (int64_t j = 0; j < K; j++) {
          const REAL *r = rows + j * P;
          if (S == 1) { /* lane ix reads r[ix - j + p] */
            acc0 = _mm512_add_ps(acc0, _mm512_maskz_loadu_ps(m[j][0], r + p - j));
            if (nv == 2) acc1 = _mm512_add_ps(acc1, _mm512_maskz_loadu_ps(m[j][1], r + 16 + p - j));
          } else { /* lane ix reads r[(ix - j + p) / 2] where that is whole */
            const __m512 row = _mm512_maskz_loadu_ps(in_row, r);
            acc0 = _mm512_add_ps(acc0, _mm512_maskz_permutexvar_ps(m[j][0], idx[j][0], row));
            if (nv == 2) acc1 = _mm512_add_ps(acc1, _mm512_maskz_permutexvar_ps(m[j][1], idx[j][1], row));
          }
        }
      }
      REAL *o = out + (c * L->h + iy) * w;
      const __mmask16 m0 = (__mmask16)(w >= 16 ? 0xFFFF : (1u << w) - 1);
      _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), acc0));
      if (nv == 2) {
        const __mmask16 m1 = (__mmask16)(w >= 32 ? 0xFFFF : (1u << (w - 16)) - 1);
        _mm512_mask_storeu_ps(o + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o + 16), acc1));
      }
    }
}
#endif

static void col2im(const Conv *L, const REAL *col, REAL *out) {
#if FAST
  /* Row by row of out, in registers: each (i, j) adds a permuted (stride 2) or shifted (stride 1)
   * row of col, so no store is read back (overlapping stores would stall store forwarding). */
  const int64_t S = L->stride, K = L->k, p = L->pad, w = L->w, wo = L->wo;
  if ((S == 1 || S == 2) && w <= 32 && wo <= 16 && K <= 8) {
    __m512i idx[8][2];
    __mmask16 m[8][2];
    for (int64_t j = 0; j < K; j++)
      for (int v = 0; v < 2; v++) {
        int32_t id[16];
        unsigned mk = 0;
        for (int t = 0; t < 16; t++) {
          const int64_t ix = 16 * v + t, q = ix - j + p; /* q = x S */
          id[t] = 0;
          if (ix < w && q >= 0 && q % S == 0 && q / S < wo) id[t] = (int32_t)(q / S), mk |= 1u << t;
        }
        idx[j][v] = _mm512_loadu_si512(id);
        m[j][v] = (__mmask16)mk;
      }
    if (S == 1 && w <= 16) col2im_rows(L, col, out, 1, 1, idx, m);
    else if (S == 1) col2im_rows(L, col, out, 1, 2, idx, m);
    else if (w <= 16) col2im_rows(L, col, out, 2, 1, idx, m);
    else col2im_rows(L, col, out, 2, 2, idx, m);
    return;
  }
#endif
  col2im_plain(L, col, out);
}

#define MAX_LAYERS 8

typedef struct {
  int64_t layers, batch, classes, features, image; /* image: Ci H W of the input */
  Conv conv[MAX_LAYERS];
} Net;

static int64_t out_size(const Conv *L) { return L->co * L->ho * L->wo; }
static int64_t col_size(const Conv *L) { return L->ci * L->k * L->k * L->ho * L->wo; }
static int64_t wsize(const Conv *L) { return L->co * L->ci * L->k * L->k; }

static Net net_of(int64_t layers, const int64_t *spec, int64_t batch, int64_t classes) {
  Net N;
  N.layers = layers, N.batch = batch, N.classes = classes;
  for (int64_t l = 0; l < layers; l++) {
    const int64_t *s = spec + 9 * l;
    Conv c = {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]};
    N.conv[l] = c;
  }
  N.image = N.conv[0].ci * N.conv[0].h * N.conv[0].w;
  N.features = out_size(&N.conv[layers - 1]);
  return N;
}

/* The size of each of the four per-image buffers reused across layers (an unfolded input or its
 * adjoint, a transposed u, a padded input): the largest of those over the layers. */
static int64_t buffer_size(const Net *N) {
  int64_t big = 0;
  for (int64_t l = 0; l < N->layers; l++) {
    const Conv *L = &N->conv[l];
    const int64_t sizes[3] = {col_size(L), out_size(L), padded_size(L)};
    for (int k = 0; k < 3; k++) big = sizes[k] > big ? sizes[k] : big;
  }
  return big;
}

/* Per-lane scratch, in REALs: per layer and image the unfolded input, a, e, u, and the adjoints of
 * a, e, u; per layer the weight-gradient adjoints; four reused buffers; the last layer's vectors. */
static int64_t work_size(const Net *N) {
  int64_t w = 0;
  for (int64_t l = 0; l < N->layers; l++) {
    const Conv *L = &N->conv[l];
    w += N->batch * (col_size(L) + 6 * out_size(L)) + wsize(L) + L->co;
  }
  return w + 4 * buffer_size(N) + N->classes + N->features + 3 * N->batch * N->features + N->batch * 5 * N->classes;
}

int64_t sigmoid_convnet_work(int64_t layers, const int64_t *spec, int64_t batch, int64_t classes) {
  Net N = net_of(layers, spec, batch, classes);
  return work_size(&N);
}

/* Sums over n elements in VEC independent partial sums (one running sum would wait on every addition). */
#define REDUCE(acc, out)                                                   \
  do {                                                                     \
    for (int w_ = VEC / 2; w_ > 0; w_ /= 2)                                \
      for (int k_ = 0; k_ < w_; k_++) acc[k_] += acc[k_ + w_];             \
    out = acc[0];                                                          \
  } while (0)

static REAL dot(const REAL *x, const REAL *y, int64_t n) {
  REAL acc[VEC] = {0}, s = 0, r;
  int64_t e = 0;
  for (; e + VEC <= n; e += VEC)
    for (int k = 0; k < VEC; k++) acc[k] += x[e + k] * y[e + k];
  for (; e < n; e++) s += x[e] * y[e];
  REDUCE(acc, r);
  return s + r;
}

static REAL sum(const REAL *x, int64_t n) {
  REAL acc[VEC] = {0}, s = 0, r;
  int64_t e = 0;
  for (; e + VEC <= n; e += VEC)
    for (int k = 0; k < VEC; k++) acc[k] += x[e + k];
  for (; e < n; e++) s += x[e];
  REDUCE(acc, r);
  return s + r;
}

/* gbar = 2 (g - t); returns |g - t|^2 */
static REAL sq_diff(const REAL *g, const REAL *t, REAL *gbar, int64_t n) {
  REAL acc[VEC] = {0}, s = 0, r;
  int64_t e = 0;
  for (; e + VEC <= n; e += VEC)
    for (int k = 0; k < VEC; k++) {
      const REAL d = g[e + k] - t[e + k];
      acc[k] += d * d;
      gbar[e + k] = 2 * d;
    }
  for (; e < n; e++) {
    const REAL d = g[e] - t[e];
    s += d * d;
    gbar[e] = 2 * d;
  }
  REDUCE(acc, r);
  return s + r;
}

/* acc[c % VEC] += d^2 and gbar = 2 d for d = g - t over the weight gradient g^T [CK, co] (stored
 * transposed, in place of gbar) and its target t [co, CK], k by k, channels in order. */
static void weight_distance(REAL *g, const REAL *t, int64_t co, int64_t CK, REAL *acc) {
#if FAST
  /* The same sums, 16 channels per vector (channel c in lane c % 16): a stack accumulator held
   * a store and a load in each addition's dependency chain. */
  __m512 a = _mm512_loadu_ps(acc);
  const __m512i step = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int32_t)CK));
  if (co * CK < INT32_MAX) {
    for (int64_t k = 0; k < CK; k++)
      for (int64_t c0 = 0; c0 < co; c0 += 16) {
        const __mmask16 m = (__mmask16)(co - c0 >= 16 ? 0xFFFF : (1u << (co - c0)) - 1);
        const __m512i at = _mm512_add_epi32(step, _mm512_set1_epi32((int32_t)(c0 * CK + k)));
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, g + k * co + c0),
                                       _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, at, t, 4));
        a = _mm512_fmadd_ps(d, d, a); /* d = 0 in the lanes past co */
        _mm512_mask_storeu_ps(g + k * co + c0, m, _mm512_add_ps(d, d));
      }
    _mm512_storeu_ps(acc, a);
    return;
  }
#endif
  for (int64_t k = 0; k < CK; k++)
    for (int64_t c = 0; c < co; c++) {
      const REAL d = g[k * co + c] - t[c * CK + k];
      acc[c % VEC] += d * d;
      g[k * co + c] = 2 * d;
    }
}

/* y[i] = 1 / (1 + exp(-(x[i] + bias))) for i < n, in place. */
#if FAST
static inline __m512 exp16(__m512 x) { /* Cephes' expf, 16 lanes: 2^n e^r, |r| <= ln 2 / 2 */
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.0f)), _mm512_set1_ps(88.72f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

static void sigmoid(REAL *x, REAL bias, int64_t n) {
  int64_t i = 0;
#if FAST
  const __m512 one = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(bias);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + i), b);
    _mm512_storeu_ps(x + i, _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
#endif
  for (; i < n; i++) x[i] = 1 / (1 + exp(-(x[i] + bias)));
}

static void lane(const Net *N, const REAL *z, int soft, const REAL *fixed, const REAL *const *W,
                 const REAL *const *T, REAL *grad, REAL *value, REAL *work) {
  const int64_t Lc = N->layers, B = N->batch, C = N->classes, F = N->features;
  REAL *col[MAX_LAYERS], *a[MAX_LAYERS], *e[MAX_LAYERS], *u[MAX_LAYERS], *abar[MAX_LAYERS], *ebar[MAX_LAYERS],
      *ubar[MAX_LAYERS], *gW[MAX_LAYERS], *gb[MAX_LAYERS];
  REAL *p = work;
  for (int64_t l = 0; l < Lc; l++) {
    const Conv *L = &N->conv[l];
    const int64_t o = B * out_size(L);
    col[l] = p, p += B * col_size(L);
    a[l] = p, p += o;
    e[l] = p, p += o;
    u[l] = p, p += o;
    abar[l] = p, p += o;
    ebar[l] = p, p += o;
    ubar[l] = p, p += o;
    gW[l] = p, p += wsize(L);
    gb[l] = p, p += L->co;
  }
  const int64_t big = buffer_size(N);
  REAL *gcol = p, *tcol = p + big, *uT = p + 2 * big, *pad = p + 3 * big;
  p += 4 * big;
  REAL *gbf = p, *r = p + C, *sW = p + C + F, *pW = p + C + F + B * F, *svW = p + C + F + 2 * B * F;
  p += C + F + 3 * B * F;
  REAL *prob = p, *smax = p + B * C, *delta = p + 2 * B * C, *dbar = p + 3 * B * C, *pbar = p + 4 * B * C;
  const REAL *Wf = W[2 * Lc], *bf = W[2 * Lc + 1];
  const int64_t img = N->image;
  REAL *xbar = grad;

  /* Forward. */
  for (int64_t l = 0; l < Lc; l++) {
    const Conv *L = &N->conv[l];
    const int64_t P = L->ho * L->wo, CK = L->ci * L->k * L->k, O = out_size(L);
    for (int64_t b = 0; b < B; b++) {
      const REAL *in = l == 0 ? z + b * img : a[l - 1] + b * out_size(&N->conv[l - 1]);
      REAL *cl = col[l] + b * col_size(L), *al = a[l] + b * O;
      im2col(L, in, cl, pad);
      gemm(L->co, CK, P, W[2 * l], CK, 1, cl, al, 0);
      for (int64_t c = 0; c < L->co; c++) sigmoid(al + c * P, W[2 * l + 1][c], P);
    }
  }
  /* The final Linear. Its [C, F] weight and target may exceed the cache (LFW: 641 classes): they are
   * read row by row, in two passes (here and for G's adjoint), each row once for all images. Here:
   * the logits o, and the rows' sums that e_L = delta W needs, sW = sum_c softmax(o)_c W_c (as
   * sum_c exp(o_c - m) W_c / sum_c exp(o_c - m), rescaled whenever the running maximum m grows) and
   * pW = sum_c p_c W_c: e_L = (sum(p) sW - pW) / B. */
  const REAL *h = a[Lc - 1];
  REAL top[B], norm[B], mass[B]; /* per image: running maximum, softmax normaliser, sum(p) */
  for (int64_t b = 0; b < B; b++) {
    REAL *pb = prob + b * C;
    if (soft) { /* the label's softmax */
      const REAL *lg = z + B * img + b * C;
      REAL mx = lg[0], s = 0;
      for (int64_t c = 1; c < C; c++) mx = lg[c] > mx ? lg[c] : mx;
      for (int64_t c = 0; c < C; c++) s += (pb[c] = exp(lg[c] - mx));
      for (int64_t c = 0; c < C; c++) pb[c] /= s;
    } else {
      memcpy(pb, fixed + b * C, (size_t)C * sizeof(REAL));
    }
    top[b] = -INFINITY, norm[b] = 0;
  }
  memset(sW, 0, (size_t)(2 * B * F) * sizeof(REAL)); /* sW and pW */
  for (int64_t c = 0; c < C; c++) {
    const REAL *Wc = Wf + c * F;
    for (int64_t b = 0; b < B; b++) {
      const REAL o = bf[c] + dot(Wc, h + b * F, F), pc = prob[b * C + c];
      REAL *sWb = sW + b * F, *pWb = pW + b * F;
      smax[b * C + c] = o;
      if (o > top[b]) {
        const REAL scale = exp(top[b] - o);
        norm[b] *= scale;
        for (int64_t f = 0; f < F; f++) sWb[f] *= scale;
        top[b] = o;
      }
      const REAL w = exp(o - top[b]);
      norm[b] += w;
      for (int64_t f = 0; f < F; f++) {
        sWb[f] += w * Wc[f];
        pWb[f] += pc * Wc[f];
      }
    }
  }
  REAL D = 0;
  for (int64_t b = 0; b < B; b++) {
    const REAL *pb = prob + b * C;
    REAL *sb = smax + b * C, *db = delta + b * C, *eb = e[Lc - 1] + b * F, *sWb = sW + b * F, psum = 0;
    for (int64_t c = 0; c < C; c++) sb[c] = exp(sb[c] - top[b]) / norm[b], psum += pb[c];
    for (int64_t c = 0; c < C; c++) db[c] = (sb[c] * psum - pb[c]) / B;
    mass[b] = psum;
    for (int64_t f = 0; f < F; f++) {
      sWb[f] /= norm[b];
      eb[f] = (psum * sWb[f] - pW[b * F + f]) / B;
    }
  }
  for (int64_t c = 0; c < C; c++) { /* the bias's gradient delta and its adjoint */
    REAL gc = -T[2 * Lc + 1][c];
    for (int64_t b = 0; b < B; b++) gc += delta[b * C + c];
    D += gc * gc;
    gbf[c] = 2 * gc;
  }

  /* Backward through the convolutions, and their weight gradients' distance to the target. */
  for (int64_t l = Lc - 1; l >= 0; l--) {
    const Conv *L = &N->conv[l];
    const int64_t P = L->ho * L->wo, CK = L->ci * L->k * L->k, O = out_size(L);
    for (int64_t i = 0; i < B * O; i++) u[l][i] = e[l][i] * a[l][i] * (1 - a[l][i]);
    memset(gb[l], 0, (size_t)L->co * sizeof(REAL));
    for (int64_t b = 0; b < B; b++) {
      const REAL *ub = u[l] + b * O;
      for (int64_t c = 0; c < L->co; c++) /* gW^T [CK, co] += unfolded input x u^T */
        for (int64_t q = 0; q < P; q++) uT[q * L->co + c] = ub[c * P + q];
      gemm(CK, P, L->co, col[l] + b * col_size(L), P, 1, uT, gW[l], b > 0);
      for (int64_t c = 0; c < L->co; c++) gb[l][c] += sum(ub + c * P, P);
      if (l > 0) {
        REAL *ep = e[l - 1] + b * out_size(&N->conv[l - 1]);
        memset(ep, 0, (size_t)out_size(&N->conv[l - 1]) * sizeof(REAL));
        gemm(CK, L->co, P, W[2 * l], 1, CK, ub, gcol, 0);
        col2im(L, gcol, ep);
      }
    }
  }
  for (int64_t l = 0; l < Lc; l++) { /* gW, gb become their adjoints 2 (g - t) */
    const int64_t co = N->conv[l].co, CK = wsize(&N->conv[l]) / co;
    REAL acc[VEC] = {0}, sq;
    weight_distance(gW[l], T[2 * l], co, CK, acc);
    REDUCE(acc, sq);
    D += sq;
    D += sq_diff(gb[l], T[2 * l + 1], gb[l], N->conv[l].co);
  }

  /* The backward pass, differentiated: adjoints of u and e, first layer first. */
  for (int64_t l = 0; l < Lc; l++) {
    const Conv *L = &N->conv[l];
    const int64_t P = L->ho * L->wo, CK = L->ci * L->k * L->k, O = out_size(L);
    for (int64_t b = 0; b < B; b++) {
      REAL *ub = ubar[l] + b * O;
      gemm(L->co, CK, P, gW[l], 1, L->co, col[l] + b * col_size(L), ub, 0);
      for (int64_t c = 0; c < L->co; c++)
        for (int64_t q = 0; q < P; q++) ub[c * P + q] += gb[l][c];
      if (l > 0) { /* e_{l-1} = unfold^T(W^T u) */
        im2col(L, ebar[l - 1] + b * out_size(&N->conv[l - 1]), tcol, pad);
        gemm(L->co, CK, P, W[2 * l], CK, 1, tcol, ub, 1);
      }
    }
    for (int64_t i = 0; i < B * O; i++) { /* u = e a (1 - a) */
      const REAL al = a[l][i], ds = al * (1 - al);
      ebar[l][i] = ubar[l][i] * ds;
      abar[l][i] = ubar[l][i] * e[l][i] * (1 - 2 * al);
    }
  }
  /* The Linear's weight gradient G, its distance to the target and its adjoint 2 r, row by row:
   * r = G_c - T_c = sum_b delta_bc h_b - T_c, dbar = gbar + W ebar_L + 2 r h (from e_L = delta W,
   * G = delta^T h, g = delta), hbar += delta 2 r; with v = dbar sum p / B, svW accumulates
   * softmax v W. */
  memset(svW, 0, (size_t)(B * F) * sizeof(REAL));
  for (int64_t c = 0; c < C; c++) {
    const REAL *Wc = Wf + c * F, *Tc = T[2 * Lc] + c * F;
    for (int64_t f = 0; f < F; f++) r[f] = -Tc[f];
    for (int64_t b = 0; b < B; b++) {
      const REAL d = delta[b * C + c], *hb = h + b * F;
      for (int64_t f = 0; f < F; f++) r[f] += d * hb[f];
    }
    D += dot(r, r, F);
    for (int64_t b = 0; b < B; b++) {
      const REAL d = delta[b * C + c], *hb = h + b * F, *eb = ebar[Lc - 1] + b * F;
      const REAL db = gbf[c] + dot(Wc, eb, F) + 2 * dot(r, hb, F), sv = smax[b * C + c] * db * mass[b] / B;
      REAL *hbar = abar[Lc - 1] + b * F, *svWb = svW + b * F;
      dbar[b * C + c] = db;
      for (int64_t f = 0; f < F; f++) {
        hbar[f] += 2 * d * r[f];
        svWb[f] += sv * Wc[f];
      }
    }
  }
  for (int64_t b = 0; b < B; b++) {
    const REAL *sb = smax + b * C, *pb = prob + b * C, *dbb = dbar + b * C;
    REAL *pbb = pbar + b * C, *hbar = abar[Lc - 1] + b * F;
    const REAL psum = mass[b];
    REAL ds = 0, sv = 0;
    /* delta = (softmax(o) sum p - p) / B; o = W h + b: hbar += W^T obar = svW - (s . v) sW */
    for (int64_t c = 0; c < C; c++) sv += sb[c] * dbb[c] * psum / B, ds += dbb[c] * sb[c];
    for (int64_t f = 0; f < F; f++) hbar[f] += svW[b * F + f] - sv * sW[b * F + f];
    for (int64_t c = 0; c < C; c++) pbb[c] = (ds - dbb[c]) / B;
    if (soft) { /* p = softmax(label logits) */
      REAL pp = 0;
      for (int64_t c = 0; c < C; c++) pp += pb[c] * pbb[c];
      for (int64_t c = 0; c < C; c++) grad[B * img + b * C + c] = pb[c] * (pbb[c] - pp);
    }
  }

  *value = D;

  /* The forward pass, differentiated: last layer first, into the input's gradient. */
  memset(xbar, 0, (size_t)(B * img) * sizeof(REAL));
  for (int64_t l = Lc - 1; l >= 0; l--) {
    const Conv *L = &N->conv[l];
    const int64_t P = L->ho * L->wo, CK = L->ci * L->k * L->k, O = out_size(L);
    for (int64_t b = 0; b < B; b++) {
      REAL *zb = ubar[l] + b * O; /* reused: z's adjoint */
      const REAL *ab = abar[l] + b * O, *al = a[l] + b * O;
      for (int64_t i = 0; i < O; i++) zb[i] = ab[i] * al[i] * (1 - al[i]);
      /* a_{l-1} feeds z (weights W) and G (weights G's adjoint, times u) */
      gemm(CK, L->co, P, W[2 * l], 1, CK, zb, gcol, 0);
      gemm(CK, L->co, P, gW[l], L->co, 1, u[l] + b * O, gcol, 1);
      col2im(L, gcol, l == 0 ? xbar + b * img : abar[l - 1] + b * out_size(&N->conv[l - 1]));
    }
  }
}

/* What a lane's objective needs besides z, by global lane id: each tensor is [lanes, ...], so an
 * attack's weights and targets are read where they lie, not copied per slot. */
typedef struct {
  Net N;
  int64_t soft, count;
  int64_t sizes[2 * MAX_LAYERS + 2];
  const REAL *fixed, *params[2 * MAX_LAYERS + 2], *targets[2 * MAX_LAYERS + 2];
} Bound;

int64_t sigmoid_convnet_bound_size(void) { return (int64_t)sizeof(Bound); }

/* Fills *out (sigmoid_convnet_bound_size() bytes) for sigmoid_convnet_lane; see sigmoid_convnet for the arguments. */
void sigmoid_convnet_bind(void *out, int64_t layers, const int64_t *spec, int64_t batch, int64_t classes, int soft,
                          const REAL *fixed, const REAL *const *params, const REAL *const *targets) {
  Bound *b = out;
  b->N = net_of(layers, spec, batch, classes);
  b->soft = soft, b->count = 2 * layers + 2, b->fixed = fixed;
  for (int64_t l = 0; l < layers; l++) b->sizes[2 * l] = wsize(&b->N.conv[l]), b->sizes[2 * l + 1] = b->N.conv[l].co;
  b->sizes[2 * layers] = classes * b->N.features, b->sizes[2 * layers + 1] = classes;
  for (int64_t k = 0; k < b->count; k++) b->params[k] = params[k], b->targets[k] = targets[k];
}

/* Lane i's objective at z [Dz]: grad [Dz], *value; work: sigmoid_convnet_work REALs of its own.
 * Denormals are flushed for the lane (each thread has its own control register) and the caller's
 * mode restored. lbfgs_kernels.c's lbfgs_rounds calls this through a pointer. */
void sigmoid_convnet_lane(const void *ctx, int64_t i, const REAL *z, REAL *grad, REAL *value, REAL *work) {
  const Bound *b = ctx;
  const REAL *W[2 * MAX_LAYERS + 2], *T[2 * MAX_LAYERS + 2];
  for (int64_t k = 0; k < b->count; k++)
    W[k] = b->params[k] + i * b->sizes[k], T[k] = b->targets[k] + i * b->sizes[k];
  const unsigned csr = flush_denormals();
  lane(&b->N, z, (int)b->soft, b->fixed + i * b->N.batch * b->N.classes, W, T, grad, value, work);
  restore_denormals(csr);
}

/* For every lane l: z [n, Dz] (B images, then B label logit rows when soft), fixed [n, B, C] (the
 * label probabilities when not soft), params/targets: 2 L + 2 pointers (each layer's weight and bias,
 * then the final Linear's), each to [n, ...]; writes grad [n, Dz] and value [n]. */
void sigmoid_convnet(int64_t n, int64_t layers, const int64_t *spec, int64_t batch, int64_t classes, int64_t Dz,
                     const REAL *z, int soft, const REAL *fixed, const REAL *const *params,
                     const REAL *const *targets, REAL *grad, REAL *value, REAL *work, int threads) {
  (void)threads; /* only OpenMP reads it */
  Bound b;
  sigmoid_convnet_bind(&b, layers, spec, batch, classes, soft, fixed, params, targets);
  const int64_t ws = work_size(&b.N); /* scratch per thread */
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; i++)
    sigmoid_convnet_lane(&b, i, z + i * Dz, grad + i * Dz, value + i, work + thread_id() * ws);
}
