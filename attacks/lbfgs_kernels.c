/* The two passes of the lane-batched L-BFGS over each lane's history (see lbfgs_kernels.py).
 *
 * Built twice by lbfgs_kernels.py, with REAL = float and REAL = double. Every lane is a
 * separate [R, D] row-major matrix; lanes are independent (split over OpenMP threads), and a
 * lane's result never depends on the others or on the thread count.
 */
#include <stdint.h>

#ifndef REAL
#define REAL float
#endif

/* Accumulators span 64 bytes: one AVX-512 register, two AVX2 ones. */
#define WIDTH (64 / (int)sizeof(REAL))
/* Rows per block: pass 1 reuses each g, y load for ROWS rows, pass 2 each load and store of d. */
#define ROWS 8

/* out[l, r, 0] = buf[l, r, :] . g[l, :],  out[l, r, 1] = buf[l, r, :] . y[l, :] */
void history_dots(int64_t n, int64_t R, int64_t D, const REAL *buf, const REAL *g, const REAL *y, REAL *out,
                  int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t l = 0; l < n; l++) {
    const REAL *gl = g + l * D, *yl = y + l * D;
    for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
      const int rows = R - r0 < ROWS ? (int)(R - r0) : ROWS;
      const REAL *p = buf + (l * R + r0) * D;
      REAL ag[ROWS][WIDTH] = {{0}}, ay[ROWS][WIDTH] = {{0}};
      int64_t d = 0;
      if (rows == ROWS) {
        for (; d + WIDTH <= D; d += WIDTH)
          for (int k = 0; k < WIDTH; k++) {
            const REAL gv = gl[d + k], yv = yl[d + k];
            for (int j = 0; j < ROWS; j++) {
              ag[j][k] += p[j * D + d + k] * gv;
              ay[j][k] += p[j * D + d + k] * yv;
            }
          }
      }
      for (int j = 0; j < rows; j++) {
        REAL sg = 0, sy = 0;
        for (int64_t e = d; e < D; e++) {
          sg += p[j * D + e] * gl[e];
          sy += p[j * D + e] * yl[e];
        }
        for (int k = 0; k < WIDTH; k++) {
          sg += ag[j][k];
          sy += ay[j][k];
        }
        out[(l * R + r0 + j) * 2] = sg;
        out[(l * R + r0 + j) * 2 + 1] = sy;
      }
    }
  }
}

/* For lanes with push[l]: buf[l, slot[l], :] = s[l, :] and buf[l, R/2 + slot[l], :] = y[l, :]. Then, with
 * the updated history, out[l, :] = base[l, :] + sum_r coef[l, r] buf[l, r, :]. */
void history_write_combine(int64_t n, int64_t R, int64_t D, REAL *buf, const int64_t *slot, const uint8_t *push,
                           const REAL *s, const REAL *y, const REAL *coef, const REAL *base, REAL *out, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t l = 0; l < n; l++) {
    if (push[l]) {
      REAL *ps = buf + (l * R + slot[l]) * D, *py = buf + (l * R + R / 2 + slot[l]) * D;
      for (int64_t d = 0; d < D; d++) {
        ps[d] = s[l * D + d];
        py[d] = y[l * D + d];
      }
    }
    REAL *o = out + l * D;
    const REAL *c = coef + l * R;
    for (int64_t d = 0; d < D; d++) o[d] = base[l * D + d];
    for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
      const int rows = R - r0 < ROWS ? (int)(R - r0) : ROWS;
      const REAL *p = buf + (l * R + r0) * D;
      if (rows == ROWS) {
        for (int64_t d = 0; d < D; d++) {
          REAL acc = o[d];
          for (int j = 0; j < ROWS; j++) acc += c[r0 + j] * p[j * D + d];
          o[d] = acc;
        }
      } else {
        for (int j = 0; j < rows; j++)
          for (int64_t d = 0; d < D; d++) o[d] += c[r0 + j] * p[j * D + d];
      }
    }
  }
}
