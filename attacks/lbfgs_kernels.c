/* A lane-batched L-BFGS round on the CPU: lbfgs_round (lbfgs.py's _round, lane by lane) and the
 * direction alone, history_direction (lbfgs.py's _direction); see lbfgs_kernels.py.
 *
 * Built twice by lbfgs_kernels.py, with REAL = float and REAL = double. Lanes are independent
 * (split over OpenMP threads): a lane's result never depends on the others or on the thread count.
 */
#include <math.h>
#include <tgmath.h> /* fabs of a float is a float: the break tests round as torch's float32 ones */
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

/* Accumulators span 64 bytes: one AVX-512 register, two AVX2 ones. */
#define WIDTH (64 / (int)sizeof(REAL))
/* Rows per block: pass 1 reuses each g, y load for ROWS rows, pass 2 each load and store of d. */
#define ROWS 8

/* A history row's stride, also for the caller, who allocates the history as [lanes, 2H, this]: D
 * rounded up to whole 64-byte lines (the padding is never read). With D = 3082 floats unpadded, 7 of
 * 8 rows start inside a line and every vector load of them straddles two; padded, the two passes
 * read 1.3-1.5x faster from L2 (a C benchmark of the passes, 64 rows). */
int64_t history_row(int64_t D) { return (D + WIDTH - 1) / WIDTH * WIDTH; }

/* x . y over n elements, in WIDTH independent sums (a single running sum would wait on every addition). */
static REAL dot(const REAL *x, const REAL *y, int64_t n) {
  REAL acc[WIDTH] = {0}, sum = 0;
  int64_t e = 0;
  for (; e + WIDTH <= n; e += WIDTH)
    for (int k = 0; k < WIDTH; k++) acc[k] += x[e + k] * y[e + k];
  for (; e < n; e++) sum += x[e] * y[e];
  for (int w = WIDTH / 2; w > 0; w /= 2) /* pairwise: log2(WIDTH) dependent additions, not WIDTH */
    for (int k = 0; k < w; k++) acc[k] += acc[k + w];
  return sum + acc[0];
}

/* Pass 1 on rows [r0, r0 + ROWS) of p ([rows, P], D used): dg[r] = p[r] . g, dy[r] = p[r] . y. */
static void dots_block(const REAL *p, int64_t r0, int64_t D, int64_t P, const REAL *g, const REAL *y, REAL *dg,
                       REAL *dy) {
  const REAL *b = p + r0 * P;
  REAL ag[ROWS][WIDTH] = {{0}}, ay[ROWS][WIDTH] = {{0}};
  int64_t d = 0;
  for (; d + WIDTH <= D; d += WIDTH)
    for (int k = 0; k < WIDTH; k++) {
      const REAL gv = g[d + k], yv = y[d + k];
      for (int j = 0; j < ROWS; j++) {
        ag[j][k] += b[j * P + d + k] * gv;
        ay[j][k] += b[j * P + d + k] * yv;
      }
    }
  for (int j = 0; j < ROWS; j++) {
    REAL sg = 0, sy = 0;
    for (int64_t e = d; e < D; e++) {
      sg += b[j * P + e] * g[e];
      sy += b[j * P + e] * y[e];
    }
    for (int k = 0; k < WIDTH; k++) {
      sg += ag[j][k];
      sy += ay[j][k];
    }
    dg[r0 + j] = sg;
    dy[r0 + j] = sy;
  }
}

/* Pass 1 on rows [0, rows) of p, last rows first, so that pass 2 (first row to last) starts on the
 * rows still in cache. Blocks of ROWS from row 0, the last rows % ROWS one at a time: each row is
 * summed the same way whatever the order of the walk. */
static void dots_rows_back(const REAL *p, int64_t rows, int64_t D, int64_t P, const REAL *g, const REAL *y,
                           REAL *dg, REAL *dy) {
  const int64_t blocked = rows - rows % ROWS;
  for (int64_t r = rows - 1; r >= blocked; r--) {
    dg[r] = dot(p + r * P, g, D);
    dy[r] = dot(p + r * P, y, D);
  }
  for (int64_t r0 = blocked - ROWS; r0 >= 0; r0 -= ROWS) dots_block(p, r0, D, P, g, y, dg, dy);
}

/* Pass 2 on rows [0, rows) of p ([rows, P], D used): o += sum_r c[r] p[r]. A block's ROWS
 * coefficients stay in registers (locals, and o aliases neither p nor c): re-read at every element,
 * as when o might alias c, the pass ran 1.6x slower from L2 (a C benchmark; the same sums). */
static void combine_rows(REAL *restrict o, const REAL *restrict p, const REAL *restrict c, int64_t rows, int64_t D,
                         int64_t P) {
  for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
    const int nr = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
    const REAL *b = p + r0 * P;
    if (nr == ROWS) {
      REAL cb[ROWS];
      for (int j = 0; j < ROWS; j++) cb[j] = c[r0 + j];
      for (int64_t d = 0; d < D; d++) {
        REAL acc = o[d];
        for (int j = 0; j < ROWS; j++) acc += cb[j] * b[j * P + d];
        o[d] = acc;
      }
    } else {
      for (int j = 0; j < nr; j++) {
        const REAL cj = c[r0 + j];
        for (int64_t d = 0; d < D; d++) o[d] += cj * b[j * P + d];
      }
    }
  }
}

/* The rows of the pairs held in slots [st, st + len) of a ring of H slots, as up to 4 runs
 * (first_row, rows) in pass 2's order: S rows are 0..H-1, Y rows H..2H-1. A full ring is all 2H rows
 * at once (no remainder blocks). Returns the number of runs. */
static int held_runs(int64_t st, int64_t len, int64_t H, int64_t runs[4][2]) {
  if (len == H) {
    runs[0][0] = 0, runs[0][1] = 2 * H;
    return 1;
  }
  const int64_t end = st + len, n1 = (end < H ? end : H) - st;
  runs[0][0] = st, runs[0][1] = n1;
  runs[1][0] = H + st, runs[1][1] = n1;
  if (end <= H) return 2;
  runs[2][0] = 0, runs[2][1] = end - H;
  runs[3][0] = H, runs[3][1] = end - H;
  return 4;
}

/* Per-thread scratch: the direction's, by row (2H) or by chronological position (H), the round's
 * new pair (s, y: D each) and, in lbfgs_rounds, the evaluation's gradient (g_new: D). */
typedef struct {
  REAL *dg, *dy, *coef, *Sg, *Yg, *Sy, *Yy, *a, *c, *s, *y, *g_new;
} Scratch;
#define WORK_PER_THREAD(H, D) (12 * (H) + 3 * (D))

/* The scratch each thread needs, so that the caller allocates exactly [threads, this]. */
int64_t kernel_work(int64_t H, int64_t D) { return WORK_PER_THREAD(H, D); }

static Scratch scratch(REAL *work, int thread, int64_t H, int64_t D) {
  REAL *w = work + thread * WORK_PER_THREAD(H, D);
  Scratch t = {w,          w + 2 * H,  w + 4 * H,  w + 6 * H,  w + 7 * H,         w + 8 * H,
               w + 9 * H,  w + 10 * H, w + 11 * H, w + 12 * H, w + 12 * H + D, w + 12 * H + 2 * D};
  return t;
}

/* The direction of one lane, between the passes: the new pair enters R, YY, start, len; the two
 * loops give pass 2's coefficients by row. */
static void lane_algebra(int64_t H, REAL *R, REAL *YY, int64_t *start, int64_t *length, const REAL *dn, int pu,
                         REAL h, Scratch t) {
  int64_t st = *start, len = *length;
  const int full = len == H;
  if (pu && full) st = (st + 1) % H;
  if (pu && !full) len += 1;
  *start = st;
  *length = len;
  const int64_t p = len > 0 ? len - 1 : 0; /* the new pair's position */
  for (int64_t i = 0; i < H; i++) { /* by row -> by position; positions >= len are unused */
    const int64_t k = (st + i) % H;
    const int used = i < len;
    t.Sg[i] = used ? t.dg[k] : 0;
    t.Sy[i] = used ? t.dy[k] : 0;
    t.Yg[i] = used ? t.dg[H + k] : 0;
    t.Yy[i] = used ? t.dy[H + k] : 0;
  }
  if (pu) { /* position p held the evicted pair or nothing during pass 1 */
    t.Sg[p] = dn[2];
    t.Yg[p] = dn[3];
    t.Yy[p] = dn[1];
    if (full) /* the oldest pair leaves: shift R and YY up-left by one (the last row, column are rewritten) */
      for (int64_t i = 0; i + 1 < H; i++) {
        memmove(R + i * H, R + (i + 1) * H + 1, (size_t)(H - 1) * sizeof(REAL));
        memmove(YY + i * H, YY + (i + 1) * H + 1, (size_t)(H - 1) * sizeof(REAL));
      }
    /* New column p of R: s_i.y_new above the diagonal, y_new.s_new on it, 0 below; row and column p of YY. */
    for (int64_t i = 0; i < H; i++) {
      R[i * H + p] = i < p ? t.Sy[i] : (i == p ? dn[0] : 0);
      YY[i * H + p] = t.Yy[i];
      YY[p * H + i] = t.Yy[i];
    }
  }
  /* First loop <=> R a = -S^T g (upper triangular); second <=> R^T c = diag(R) a - h Y^T (-g - Y a). */
  REAL *a = t.a, *c = t.c;
  for (int64_t i = len - 1; i >= 0; i--)
    a[i] = (-t.Sg[i] - dot(R + i * H + i + 1, a + i + 1, len - i - 1)) / R[i * H + i];
  for (int64_t i = 0; i < len; i++) c[i] = t.Yg[i];
  for (int64_t j = 0; j < len; j++) { /* c = Y^T g + YY a, by rows of the symmetric YY (no reductions) */
    const REAL aj = a[j], *YYj = YY + j * H;
    for (int64_t i = 0; i < len; i++) c[i] += YYj[i] * aj;
  }
  for (int64_t i = 0; i < len; i++) c[i] = R[i * H + i] * a[i] + h * c[i]; /* the right-hand side */
  for (int64_t i = 0; i < len; i++) { /* forward substitution by rows of R (= columns of R^T) */
    c[i] /= R[i * H + i];
    const REAL ci = c[i], *Ri = R + i * H;
    for (int64_t k = i + 1; k < len; k++) c[k] -= Ri[k] * ci;
  }
  for (int64_t i = 0; i < len; i++) { /* d = -h g + S c - h Y a */
    const int64_t k = (st + i) % H;
    t.coef[k] = c[i];
    t.coef[H + k] = -h * a[i];
  }
}

/* One lane's direction: the new pair (s, y; dn = y.s, y.y, s.g, y.g) joins the history
 * B [2H, history_row(D)] if push (evicting the oldest pair when full), R, YY, start, length follow,
 * and out [D] = -H g.
 * Pass 1 walks the rows backwards, so pass 2 (first row to last) starts on the rows it read last,
 * which a 2 MB L2 still holds: on the Intel Xeon of 2026-11-27 (32 full lanes, one thread) a call
 * took 5.4-5.8 ms against 6.5-6.8 ms with both passes forwards over all lanes in turn. */
static void lane_direction(int64_t H, int64_t D, REAL *B, REAL *R, REAL *YY, int64_t *start, int64_t *length,
                           const REAL *g, const REAL *s, const REAL *y, const REAL *dn, int push, REAL h,
                           REAL *out, Scratch t) {
  const int64_t P = history_row(D);
  int64_t runs[4][2];
  for (int k = held_runs(*start, *length, H, runs) - 1; k >= 0; k--) /* pass 1, last run first */
    dots_rows_back(B + runs[k][0] * P, runs[k][1], D, P, g, y, t.dg + runs[k][0], t.dy + runs[k][0]);
  const int64_t slot = (*start + *length) % H; /* the free slot, or the oldest one when full */
  lane_algebra(H, R, YY, start, length, dn, push, h, t);
  if (push) {
    memcpy(B + slot * P, s, (size_t)D * sizeof(REAL));
    memcpy(B + (H + slot) * P, y, (size_t)D * sizeof(REAL));
  }
  for (int64_t e = 0; e < D; e++) out[e] = -h * g[e];
  for (int k = 0, m = held_runs(*start, *length, H, runs); k < m; k++) /* pass 2, with the new pair */
    combine_rows(out, B + runs[k][0] * P, t.coef + runs[k][0], runs[k][1], D, P);
}

/* The direction alone, for every lane l (all arrays lane-major; see _direction in lbfgs.py for the
 * same in tensor form; the engine calls lbfgs_round, which calls lane_direction the same way):
 *   buf [2H, history_row(D)]: rows 0..H-1 hold s, H..2H-1 hold y, a ring of len pairs starting at
 *   slot start (each row's padding beyond D unused);
 *   R, YY [H, H]: triu(S^T Y) and Y^T Y by chronological position (oldest first);
 *   g, s, y [D]; dots_new [4] = (y.s, y.y, s.g, y.g); push: whether (s, y) joins the history
 *   (evicting the oldest pair when full); h_diag [1] = H_diag; need: whether the lane's direction is
 *   used this round (push implies need). A lane without need is skipped: out = 0, its history unchanged.
 * Writes out [D] = -H g (torch.optim.LBFGS's two-loop recursion, in the compact form of Byrd,
 * Nocedal & Schnabel 1994) and updates buf, R, YY, start, len in place. work: see kernel_work. */
void history_direction(int64_t n, int64_t H, int64_t D, REAL *buf, REAL *R, REAL *YY, int64_t *start,
                       int64_t *length, const REAL *g, const REAL *s, const REAL *y, const REAL *dots_new,
                       const uint8_t *push, const uint8_t *need, const REAL *h_diag, REAL *out, REAL *work,
                       int threads) {
  (void)threads; /* only OpenMP reads it */
  const int64_t lane_floats = 2 * H * history_row(D); /* one lane's history */
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
  for (int64_t l = 0; l < n; l++) {
    if (!need[l]) {
      memset(out + l * D, 0, (size_t)D * sizeof(REAL));
      continue;
    }
    lane_direction(H, D, buf + l * lane_floats, R + l * H * H, YY + l * H * H, start + l, length + l, g + l * D,
                   s + l * D, y + l * D, dots_new + 4 * l, push[l] != 0, h_diag[l], out + l * D,
                   scratch(work, thread_id(), H, D));
  }
}

/* The trace column of a round: the lane's step count before it, at most the last step. */
static int64_t trace_col(int64_t steps, int64_t max_steps) { return steps < max_steps - 1 ? steps : max_steps - 1; }

/* Lane states of the round (see lbfgs_round); int64 where the tensor form keeps torch.long. */
typedef struct {
  int64_t *status, *it, *n_iter, *evals, *steps, *closures;
} Counters;
enum { RUNNING = 0, CONVERGED = 1, BUDGET = 2, DIVERGED = 3 };

static REAL absmax(const REAL *v, int64_t n) {
  REAL m = 0;
  for (int64_t e = 0; e < n; e++) m = fabs(v[e]) > m ? fabs(v[e]) : m;
  return m;
}

static REAL abssum(const REAL *v, int64_t n) {
  REAL acc[WIDTH] = {0}, sum = 0;
  int64_t e = 0;
  for (; e + WIDTH <= n; e += WIDTH)
    for (int k = 0; k < WIDTH; k++) acc[k] += fabs(v[e + k]);
  for (; e < n; e++) sum += fabs(v[e]);
  for (int w = WIDTH / 2; w > 0; w /= 2)
    for (int k = 0; k < w; k++) acc[k] += acc[k + w];
  return sum + acc[0];
}

/* One lane's round after its evaluation (f_new, g_new) arrived: attacks.lbfgs._arrive, the
 * direction and attacks.lbfgs._move, in the same order and with the same tests (the tensor form
 * documents each against torch.optim.LBFGS.step). Sets *start where this evaluation started a
 * step (its loss is what step() returns); leaves it alone otherwise. */
static void lane_round(int64_t l, int64_t H, int64_t D, REAL f_new, const REAL *g_new, REAL *x, REAL *x_ok,
                       Counters c, REAL *loss, REAL *g, REAL *prev_g, REAL *prev_loss, REAL *d, REAL *t,
                       REAL *h_diag, REAL *final_loss, REAL *B, REAL *R, REAL *YY, int64_t *hstart, int64_t *hlen,
                       uint8_t *start, const int64_t *ilim, const double *flim, Scratch w) {
  const int64_t max_steps = ilim[0], max_iter = ilim[1], eval_budget = ilim[2];
  const REAL lr = (REAL)flim[0], tolerance_grad = (REAL)flim[1], tolerance_change = (REAL)flim[2];
  c.closures[l] += 1;
  int ok = isfinite(f_new);
  for (int64_t e = 0; e < D && ok; e++) ok = isfinite(g_new[e]);
  if (!ok) { /* frozen at its last finite iterate; nothing of it is stored */
    c.status[l] = DIVERGED;
    memcpy(x, x_ok, (size_t)D * sizeof(REAL));
    return;
  }
  memcpy(x_ok, x, (size_t)D * sizeof(REAL));
  memcpy(g, g_new, (size_t)D * sizeof(REAL));
  loss[l] = final_loss[l] = f_new;
  const int opt_cond = absmax(g, D) <= tolerance_grad;
  const int at_start = c.it[l] == 0;
  *start = (uint8_t)at_start;
  int go;
  if (at_start) {
    c.evals[l] = 1;
    if (opt_cond) { /* torch returns at once, and every later step would repeat this */
      c.status[l] = CONVERGED;
      c.steps[l] += 1;
    }
    go = !opt_cond;
  } else {
    c.evals[l] += 1;
    const int brk = c.evals[l] >= eval_budget || opt_cond || absmax(d, D) * fabs(t[l]) <= tolerance_change ||
                    fabs((double)loss[l] - (double)prev_loss[l]) < (double)tolerance_change;
    if (brk) { /* the next round re-evaluates the same point, as torch's next step() does */
      c.steps[l] += 1;
      c.it[l] = 0;
      if (c.steps[l] >= max_steps) c.status[l] = BUDGET;
    }
    go = !brk;
  }
  if (!go) return;
  c.it[l] += 1;
  c.n_iter[l] += 1;
  const int first = c.n_iter[l] == 1;
  REAL *s = w.s, *y = w.y, dn[4];
  for (int64_t e = 0; e < D; e++) {
    y[e] = g[e] - prev_g[e];
    s[e] = d[e] * t[l];
  }
  dn[0] = dot(y, s, D), dn[1] = dot(y, y, D), dn[2] = dot(s, g, D), dn[3] = dot(y, g, D);
  const int push = !first && dn[0] > (REAL)1e-10; /* curvature pair from the previous iteration */
  if (push) h_diag[l] = dn[0] / dn[1];
  lane_direction(H, D, B, R, YY, hstart + l, hlen + l, g, s, y, dn, push, h_diag[l], d, w);
  memcpy(prev_g, g, (size_t)D * sizeof(REAL));
  prev_loss[l] = loss[l];
  if (first) {
    const REAL inv = (REAL)1 / abssum(g, D);
    t[l] = (inv < 1 ? inv : 1) * lr;
  } else {
    t[l] = lr;
  }
  if (dot(g, d, D) > -tolerance_change) { /* not a descent direction: this and every later step stays */
    c.steps[l] += 1;
    c.it[l] = 0;
    c.status[l] = CONVERGED;
    return;
  }
  const REAL tl = t[l];
  for (int64_t e = 0; e < D; e++) x[e] += tl * d[e];
  if (c.it[l] == max_iter) { /* torch moves without evaluating and ends the step */
    c.steps[l] += 1;
    c.it[l] = 0;
    if (c.steps[l] >= max_steps) c.status[l] = BUDGET;
  }
}

/* A whole round after the closure, for every lane l with run[l] (the others keep everything and
 * get col = their clamped step count, start = 0): the C form of attacks.lbfgs._round, with the
 * same lane-major arrays (buf as history_direction's), updated in place. ilim = (steps, max_iter,
 * eval budget); flim = (lr, tolerance_grad, tolerance_change). work: [threads, kernel_work(H, D)]. */
void lbfgs_round(int64_t n, int64_t H, int64_t D, const uint8_t *run, const REAL *f_new, const REAL *g_new,
                 REAL *x, REAL *x_ok, int64_t *status, int64_t *it, int64_t *n_iter, int64_t *evals, int64_t *steps,
                 int64_t *closures, REAL *loss, REAL *g, REAL *prev_g, REAL *prev_loss, REAL *d, REAL *t,
                 REAL *h_diag, REAL *final_loss, REAL *buf, REAL *R, REAL *YY, int64_t *hstart, int64_t *hlen,
                 int64_t *col, uint8_t *start, const int64_t *ilim, const double *flim, REAL *work, int threads) {
  (void)threads; /* only OpenMP reads it */
  const int64_t lane_floats = 2 * H * history_row(D); /* one lane's history */
  const Counters c = {status, it, n_iter, evals, steps, closures};
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
  for (int64_t l = 0; l < n; l++) {
    col[l] = trace_col(steps[l], ilim[0]);
    start[l] = 0;
    if (!run[l]) continue;
    const int64_t o = l * D;
    lane_round(l, H, D, f_new[l], g_new + o, x + o, x_ok + o, c, loss, g + o, prev_g + o, prev_loss, d + o, t,
               h_diag, final_loss, buf + l * lane_floats, R + l * H * H, YY + l * H * H, hstart, hlen, start + l,
               ilim, flim, scratch(work, thread_id(), H, D));
  }
}

/* One lane's objective at z [D] (lane: the attack's id among all lanes): grad [D], *value; work is
 * the objective's own scratch. sigmoid_convnet.c's sigmoid_convnet_lane has this type. */
typedef void (*LaneObjective)(const void *ctx, int64_t lane, const REAL *z, REAL *grad, REAL *value, REAL *work);

/* Up to `rounds` whole rounds of every running lane l, lane after lane: its evaluation at x (the
 * objective f of attack act[l]), then lane_round; a lane that stops ends its turn. A lane's
 * iterates are those of as many lbfgs_round calls (the order of lanes never mattered), but its
 * history, weights and targets stay in this core's cache from one of its rounds to the next: a
 * round reads the history backwards and then forwards, so the next round starts on the rows just
 * read. Per round, as BatchedLBFGS.run does between lbfgs_round calls: at a step start the loss
 * goes to trace[act[l], col] ([count, max_steps]; col is the step count before the round, clamped);
 * when the lane's step count first reaches snap_steps[j], x goes to snaps[j, act[l]] ([nsnap, count,
 * D]; snapped [nsnap, count] flags it). obj_work: [threads, obj_ws]; work: [threads, kernel_work(H,
 * D)]. *most: the most rounds any lane ran. Other arguments as lbfgs_round's. */
void lbfgs_rounds(int64_t rounds, LaneObjective f, const void *ctx, REAL *obj_work, int64_t obj_ws,
                  const int64_t *act, int64_t count, int64_t n, int64_t H, int64_t D, REAL *x, REAL *x_ok,
                  int64_t *status, int64_t *it, int64_t *n_iter, int64_t *evals, int64_t *steps, int64_t *closures,
                  REAL *loss, REAL *g, REAL *prev_g, REAL *prev_loss, REAL *d, REAL *t, REAL *h_diag,
                  REAL *final_loss, REAL *buf, REAL *R, REAL *YY, int64_t *hstart, int64_t *hlen, REAL *trace,
                  int64_t nsnap, const int64_t *snap_steps, REAL *snaps, uint8_t *snapped, const int64_t *ilim,
                  const double *flim, REAL *work, int64_t *most, int threads) {
  (void)threads; /* only OpenMP reads it */
  const int64_t lane_floats = 2 * H * history_row(D); /* one lane's history */
  const Counters c = {status, it, n_iter, evals, steps, closures};
  int64_t longest = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1) reduction(max : longest)
  for (int64_t l = 0; l < n; l++) {
    const int tid = thread_id();
    const Scratch w = scratch(work, tid, H, D);
    const int64_t o = l * D, lane = act[l];
    int64_t r = 0;
    for (; r < rounds && status[l] == RUNNING; r++) {
      REAL value;
      f(ctx, lane, x + o, w.g_new, &value, obj_work + tid * obj_ws);
      const int64_t col = trace_col(steps[l], ilim[0]);
      uint8_t start = 0;
      lane_round(l, H, D, value, w.g_new, x + o, x_ok + o, c, loss, g + o, prev_g + o, prev_loss, d + o, t, h_diag,
                 final_loss, buf + l * lane_floats, R + l * H * H, YY + l * H * H, hstart, hlen, &start, ilim, flim, w);
      if (start) trace[lane * ilim[0] + col] = loss[l];
      for (int64_t j = 0; j < nsnap; j++)
        if (steps[l] == snap_steps[j] && !snapped[j * count + lane]) {
          memcpy(snaps + (j * count + lane) * D, x + o, (size_t)D * sizeof(REAL));
          snapped[j * count + lane] = 1;
        }
    }
    longest = r > longest ? r : longest;
  }
  *most = longest;
}
