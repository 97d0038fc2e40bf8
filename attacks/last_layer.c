/* The gradient-match term of a final Linear layer's weight, one pass over its target (see last_layer.py).
 *
 * Built twice by last_layer.py, with REAL = float and REAL = double. Lanes are independent
 * (split over OpenMP threads): a lane's result never depends on the others or on the thread count.
 */
#include <stdint.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif

/* Accumulators span 64 bytes: one AVX-512 register, two AVX2 ones. */
#define WIDTH (64 / (int)sizeof(REAL))

/* Pairwise sum of WIDTH partial sums: log2(WIDTH) dependent additions, not WIDTH. */
static REAL reduce(REAL *acc) {
  for (int w = WIDTH / 2; w > 0; w /= 2)
    for (int k = 0; k < w; k++) acc[k] += acc[k + w];
  return acc[0];
}

/* One lane. delta [B, C], h [B, F], T [C, F]; r [F] is scratch. For every class c, row
 * r_c = sum_b delta[b, c] h[b] - T[c] is formed once and gives
 *   D += |r_c|^2,   gd[b, c] = 2 r_c . h[b],   gh[b] += 2 delta[b, c] r_c.
 * D sums the rows' squares in double: it adds up C partial sums of very different sizes. */
static void lane(int64_t B, int64_t C, int64_t F, const REAL *delta, const REAL *h, const REAL *T, REAL *D,
                 REAL *gd, REAL *gh, REAL *r) {
  double total = 0;
  memset(gh, 0, sizeof(REAL) * B * F);
  for (int64_t c = 0; c < C; c++) {
    const REAL *t = T + c * F;
    REAL sq[WIDTH] = {0}, sq_tail = 0;
    int64_t f;
    if (B == 1) { /* the usual case: one product per element, as autograd's outer product */
      REAL dc = delta[c];
      for (f = 0; f + WIDTH <= F; f += WIDTH)
        for (int k = 0; k < WIDTH; k++) {
          REAL v = dc * h[f + k] - t[f + k];
          r[f + k] = v;
          sq[k] += v * v;
        }
      for (; f < F; f++) {
        REAL v = dc * h[f] - t[f];
        r[f] = v;
        sq_tail += v * v;
      }
    } else {
      memset(r, 0, sizeof(REAL) * F);
      for (int64_t b = 0; b < B; b++) {
        REAL db = delta[b * C + c];
        const REAL *hb = h + b * F;
        for (f = 0; f < F; f++) r[f] += db * hb[f];
      }
      for (f = 0; f + WIDTH <= F; f += WIDTH)
        for (int k = 0; k < WIDTH; k++) {
          REAL v = r[f + k] - t[f + k];
          r[f + k] = v;
          sq[k] += v * v;
        }
      for (; f < F; f++) {
        REAL v = r[f] - t[f];
        r[f] = v;
        sq_tail += v * v;
      }
    }
    total += (double)(reduce(sq) + sq_tail);
    for (int64_t b = 0; b < B; b++) {
      const REAL *hb = h + b * F;
      REAL *gb = gh + b * F, two_d = 2 * delta[b * C + c], acc[WIDTH] = {0}, tail = 0;
      for (f = 0; f + WIDTH <= F; f += WIDTH)
        for (int k = 0; k < WIDTH; k++) {
          acc[k] += r[f + k] * hb[f + k];
          gb[f + k] += two_d * r[f + k];
        }
      for (; f < F; f++) {
        tail += r[f] * hb[f];
        gb[f] += two_d * r[f];
      }
      gd[b * C + c] = 2 * (reduce(acc) + tail);
    }
  }
  *D = (REAL)total;
}

/* n lanes: delta [n, B, C], h [n, B, F], T [n, C, F] -> D [n], gd [n, B, C], gh [n, B, F]; work [n, F]. */
void weight_match(int64_t n, int64_t B, int64_t C, int64_t F, const REAL *delta, const REAL *h, const REAL *T,
                  REAL *D, REAL *gd, REAL *gh, REAL *work, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t l = 0; l < n; l++)
    lane(B, C, F, delta + l * B * C, h + l * B * F, T + l * C * F, D + l, gd + l * B * C, gh + l * B * F,
         work + l * F);
}
