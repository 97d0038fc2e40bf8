"""Lane-batched L-BFGS: N independent ``torch.optim.LBFGS`` runs advanced together.

Each lane follows exactly the control flow of ``torch.optim.LBFGS.step`` without a line
search (PyTorch 2.x): the same first step size ``min(1, 1/|g|_1) * lr``, the same
curvature test ``y.s > 1e-10``, the same history eviction, the same scaling
``H_diag = y.s / y.y`` and the same break conditions, in the same order. Lanes only
share the closure evaluation (one batched call per round); every scalar decision is
per lane, so a lane's iterates equal those of a lone ``torch.optim.LBFGS`` run up to
float rounding.

The direction ``d = -H g`` is the two-loop recursion's result computed in its
equivalent matrix form (Byrd, Nocedal & Schnabel 1994): with ``R = triu(S^T Y)`` and
``Y^T Y`` kept up to date, the first loop is the triangular solve ``R a = -S^T g`` and
the second ``R^T c = diag(R) a - H_diag (-Y^T g - Y^T Y a)``, and
``d = -H_diag g - H_diag Y a + S c``. So every round reads each lane's [2H, D] history
twice (once for ``S^T g, Y^T g, S^T y, Y^T y``, once for ``d``) instead of running 2H
dependent vector updates. Mathematically identical; rounding differs in the last bits.

Performance notes: a round is the closure, then everything after it (arrival of the
evaluation, the direction, the move) as one call, with one host sync per round. On the CPU that
call is one C kernel, lane by lane (:mod:`attacks.lbfgs_kernels`). Elsewhere it is ``_round``, a
pure function of fixed-shape, mask-based tensor expressions over all lanes (no per-lane Python)
run under ``torch.compile`` (a few fused kernels instead of dozens of small ones), with the
direction as batched tensor code (``bmm``, triangular solves, ``baddbmm``). The small [H, H]
matrices are kept in chronological order so the solves need no gathers. Where the closure
also carries a C objective (``closure.native``, a :class:`attacks.native.LaneObjective`), the
CPU runs rows one after the other instead, ``LANE_ROUNDS`` whole rounds each per C call
(:func:`attacks.lbfgs_kernels.rounds_`): a lane's iterates are the same to the bit, but part of
its 2.5 MB history is still in this core's L2 cache at its next round and Python runs once per
call, not once per round (``bench perf``, 2 workers of 12 lanes, Intel Xeon: 0.164 against
0.213 ms per lane-closure).

One "round" evaluates the closure once for every running lane. Where the serial
optimiser would call the closure, the lane waits for the next round; everything in
between (direction, step, stopping tests) is vectorised over lanes.

Continuous batching: with ``slots`` < N only that many lanes are in the working set;
a lane that stops hands its slot (its state reset, its history cleared) to the next
waiting lane, so rounds stay full although lanes stop after 16 to 6,000 closures.

Statuses: ``running``; ``converged`` (a fixed point of the serial algorithm: its
gradient is below ``tolerance_grad`` at the start of a step, or its direction is no
longer a descent direction, so every further step would change nothing);
``budget`` (all ``steps`` optimizer steps done); ``diverged`` (loss or gradient not
finite: the lane is frozen at its last finite iterate and never touches the others).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks import lbfgs_kernels
from attacks.compiling import compile_or_eager

RUNNING, CONVERGED, BUDGET, DIVERGED = 0, 1, 2, 3
# Rounds a row runs per C call in the lane-after-lane loop. Between calls Python refills stopped
# rows and reports progress; a call of 12 rows takes 0.1-0.15 s.
LANE_ROUNDS = 32
STATUS_NAMES = {RUNNING: "running", CONVERGED: "converged", BUDGET: "budget", DIVERGED: "diverged"}

# A batched closure: (x [n, D], lane indices [n]) -> (loss [n], gradient [n, D]), lanes independent.
BatchedClosure = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

@dataclass(frozen=True)
class LBFGSSettings:
    """``torch.optim.LBFGS`` settings; defaults are the DLG reference code's."""

    steps: int = 300  # optimizer.step() calls
    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None  # None -> max_iter * 5 // 4, as in torch
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100

    @property
    def eval_budget(self) -> int:
        return self.max_eval if self.max_eval is not None else self.max_iter * 5 // 4


@dataclass
class LBFGSResult:
    x: Tensor  # [N, D] final iterate (last finite one for diverged lanes)
    status: list[str]
    closures: Tensor  # [N] closure evaluations per lane
    steps: Tensor  # [N] optimizer steps taken
    loss_trace: Tensor  # [N, steps] loss returned by each step (NaN after the lane stopped)
    final_loss: Tensor  # [N] loss at the final iterate's last evaluation
    rounds: int  # batched closure calls; lane after lane, each call's most rounds of one lane
    snapshots: dict[int, Tensor]  # step k -> [N, D] iterate at the start of step k


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class _History:
    """Every lane's last H pairs (s, y), and their small Gram matrices.

    ``buf`` is a ring buffer by slot: rows [0, H) hold s, rows [H, 2H) hold y, so one
    batched product reads S and Y together. ``R`` (= triu(S^T Y), diagonal y_i.s_i) and
    ``YY`` (= Y^T Y) are kept by chronological position (oldest first), shifted by one when
    the oldest pair is evicted: the solves need them in exactly this layout. Unused
    positions hold R = identity, YY = 0, which makes their coefficients exactly 0. The CPU's C
    kernels want each row padded to whole cache lines (``row``: floats per row, at least ``dim``).
    """

    def __init__(self, n: int, H: int, dim: int, dt: torch.dtype, dev: torch.device, row: int | None = None):
        self.H = H
        self.buf = torch.zeros(n, 2 * H, dim if row is None else row, dtype=dt, device=dev)
        self.R = torch.eye(H, dtype=dt, device=dev).repeat(n, 1, 1)
        self.YY = torch.zeros(n, H, H, dtype=dt, device=dev)
        self.len = torch.zeros(n, dtype=torch.long, device=dev)
        self.start = torch.zeros(n, dtype=torch.long, device=dev)  # slot of the oldest pair

    def clear(self, slots: Tensor) -> None:
        """Empty the history of ``slots`` (a new lane takes them over). The stale pairs must go:
        an unused position's coefficient is 0 only because its s and y are 0."""
        self.buf[slots] = 0
        self.R[slots] = torch.eye(self.H, dtype=self.R.dtype, device=self.R.device)
        self.YY[slots] = 0
        self.len[slots] = 0
        self.start[slots] = 0

    def take(self, keep: Tensor) -> None:
        """Keep only lanes ``keep`` (see the working set in :meth:`BatchedLBFGS.run`)."""
        self.buf, self.R, self.YY = self.buf[keep], self.R[keep], self.YY[keep]
        self.len, self.start = self.len[keep], self.start[keep]


def _direction(buf: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, g: Tensor, s: Tensor, y: Tensor,
               dots_new: Tensor, push: Tensor, need: Tensor, h_diag: Tensor) -> Tensor:
    """Append (s, y) to the history for lanes ``push`` (torch's pop(0) when full) and return the
    two-loop recursion's ``d = -H g`` for lanes ``need`` (0 for the others, whose history must not
    change: ``push`` implies ``need``); ``buf``, ``R``, ``YY``, ``start``, ``length`` are updated in
    place. g, s, y: [n, D]; dots_new: [n, 4] = (y.s, y.y, s.g, y.g).

    Batched tensor operations over all lanes; the CPU's C round computes the same lane by lane
    (:func:`attacks.lbfgs_kernels.direction`)."""
    # Pass 1, on the history before the new pair is written: S.g, Y.g, S.y, Y.y by slot. As
    # [n, 2, D] x [n, D, 2H] (the history transposed) MKL reads it 15 % faster than the other way round.
    dots = torch.bmm(torch.stack([g, y], 1), buf.transpose(1, 2)).transpose(1, 2)
    coef, R_new, YY_new, start_new, length_new, slot = _algebra(dots, R, YY, start, length, dots_new, push, h_diag)
    for old, new in ((R, R_new), (YY, YY_new), (start, start_new), (length, length_new)):
        old.copy_(new)
    # The new pair goes in, then pass 2: d = -H_diag g - H_diag Y a + S c.
    H, ar = buf.shape[1] // 2, torch.arange(buf.shape[0], device=buf.device)
    buf[ar, slot] = torch.where(push[:, None], s, buf[ar, slot])
    buf[ar, H + slot] = torch.where(push[:, None], y, buf[ar, H + slot])
    # baddbmm stays one MKL call under torch.compile (a [n, 1, 2H] bmm becomes a slower inductor reduction).
    d = torch.baddbmm((-h_diag[:, None] * g).unsqueeze(1), coef.unsqueeze(1), buf).squeeze(1)
    return torch.where(need[:, None], d, 0.0)


def _algebra(dots: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, dots_new: Tensor, push: Tensor,
             h_diag: Tensor) -> tuple[Tensor, ...]:
    """Everything of a round's direction between the two history passes, on [n, H, H] matrices.

    Returns pass 2's coefficients [n, 2H] by slot, the updated R, YY, start, len, and the slot
    that receives the new pair. Pure and fixed-shape, so ``torch.compile`` fuses it.
    """
    H = R.shape[1]
    pos = torch.arange(H, device=R.device)
    ys, yy, sg, yg = dots_new.unbind(1)
    full = length == H
    evict = push & full
    slot = (start + length) % H  # the free slot, or the oldest one when full
    start = torch.where(evict, (start + 1) % H, start)
    length = torch.where(push & ~full, length + 1, length)
    order = (start[:, None] + pos) % H  # chronological position -> slot
    Sg, Yg = dots[:, :H, 0].gather(1, order), dots[:, H:, 0].gather(1, order)
    Sy, Yy = dots[:, :H, 1].gather(1, order), dots[:, H:, 1].gather(1, order)
    # The new pair's position p: its slot held the evicted pair (or none) during pass 1.
    p = (length - 1).clamp(min=0)
    at_p = push[:, None] & (pos == p[:, None])
    Sg = torch.where(at_p, sg[:, None], Sg)
    Yg = torch.where(at_p, yg[:, None], Yg)
    Yy = torch.where(at_p, yy[:, None], Yy)
    ev = evict[:, None, None]
    R = torch.where(ev, R.roll((-1, -1), (1, 2)), R)
    YY = torch.where(ev, YY.roll((-1, -1), (1, 2)), YY)
    # New column p of R: s_i.y_new above the diagonal, y_new.s_new on it. R's lower triangle
    # (where the shift wraps stale values around) is never read.
    col = torch.where(pos < p[:, None], Sy, torch.where(pos == p[:, None], ys[:, None], 0.0))
    colp = at_p[:, None, :]
    R = torch.where(colp, col[:, :, None], R)
    YY = torch.where(colp, Yy[:, :, None], torch.where(at_p[:, :, None], Yy[:, None, :], YY))
    # First loop, newest to oldest: a_i = rho_i s_i.(-g - sum_{k>i} a_k y_k)  <=>  R a = -S^T g.
    a = torch.linalg.solve_triangular(R, -Sg.unsqueeze(2), upper=True)
    # r = H_diag q, q = -g - Y a; then oldest to newest: c_i = a_i - rho_i y_i.(r + sum_{k<i} c_k s_k)
    # <=>  R^T c = diag(R) a - H_diag Y^T q.
    h = h_diag[:, None, None]
    yq = -Yg.unsqueeze(2) - torch.bmm(YY, a)
    c = torch.linalg.solve_triangular(R.mT, R.diagonal(0, 1, 2).unsqueeze(2) * a - h * yq, upper=False)
    inv = (pos - start[:, None]) % H  # slot -> chronological position
    coef = torch.cat([c.squeeze(2).gather(1, inv), (-h[:, :, 0] * a.squeeze(2)).gather(1, inv)], 1)
    return coef, R, YY, start, length, slot


def _arrive(run: Tensor, f_new: Tensor, g_new: Tensor, x: Tensor, x_ok: Tensor, status: Tensor, it: Tensor,
            n_iter: Tensor, evals: Tensor, steps: Tensor, closures: Tensor, loss: Tensor, g: Tensor, prev_g: Tensor,
            prev_loss: Tensor, d: Tensor, t: Tensor, h_diag: Tensor, final_loss: Tensor,
            limits: tuple) -> tuple[Tensor, ...]:
    """A round's evaluation arrives (rows ``run``): divergence, torch's break tests, and the start
    of the next iteration up to the direction (which needs the history). Pure, fixed-shape."""
    max_steps, _, _, eval_budget, tolerance_grad, tolerance_change = limits
    closures = closures + run
    ok = run & torch.isfinite(f_new) & torch.isfinite(g_new).all(1)
    # Diverged lanes are frozen at their last finite iterate; nothing of theirs is stored.
    status = torch.where(run & ~ok, DIVERGED, status)
    x = torch.where((run & ~ok)[:, None], x_ok, x)
    x_ok = torch.where(ok[:, None], x, x_ok)
    loss = torch.where(ok, f_new, loss)
    g = torch.where(ok[:, None], g_new, g)
    final_loss = torch.where(ok, loss, final_loss)
    opt_cond = ok & (g.abs().amax(1) <= tolerance_grad)
    # Evaluation at the start of a step: its loss is what step() returns (trace column ``col``).
    start = ok & (it == 0)
    col = steps.clamp(max=max_steps - 1)
    evals = torch.where(start, 1, evals)
    status = torch.where(start & opt_cond, CONVERGED, status)  # torch returns at once, and
    steps = steps + (start & opt_cond)  # every later step would repeat this
    # Evaluation after a move inside a step: torch's break tests.
    inner = ok & (it > 0)
    evals = evals + inner
    brk = inner & (
        (evals >= eval_budget)
        | opt_cond
        | (d.abs().amax(1) * t.abs() <= tolerance_change)  # = |d t|_max, rounding is monotonic
        | ((loss.double() - prev_loss.double()).abs() < tolerance_change)  # torch: Python floats
    )
    # A break ends the step; the next round re-evaluates the same point, as torch's next step() does.
    steps = steps + brk
    it = torch.where(brk, 0, it)
    status = torch.where(brk & (steps >= max_steps), BUDGET, status)
    # The body of torch's `while n_iter < max_iter` loop, for lanes `go`.
    go = (start & ~opt_cond) | (inner & ~brk)
    it = it + go
    n_iter = n_iter + go
    first = go & (n_iter == 1)
    y = g - prev_g
    st = d * t[:, None]
    ys = _dot(y, st)
    yy = _dot(y, y)
    # Curvature pair from the previous iteration (not on a lane's very first iteration).
    push = go & ~first & (ys > 1e-10)
    h_diag = torch.where(push, ys / yy, h_diag)
    dots_new = torch.stack([ys, yy, _dot(st, g), _dot(y, g)], 1)
    return (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, final_loss, h_diag, col, start, go, first,
            push, st, y, dots_new)


def _move(go: Tensor, first: Tensor, d_new: Tensor, g: Tensor, loss: Tensor, d: Tensor, prev_g: Tensor,
          prev_loss: Tensor, t: Tensor, x: Tensor, it: Tensor, steps: Tensor, status: Tensor,
          limits: tuple) -> tuple[Tensor, ...]:
    """The rest of the iteration for rows ``go``: step size, descent test, the move. Pure, fixed-shape."""
    max_steps, lr, max_iter, _, _, tolerance_change = limits
    d = torch.where(go[:, None], d_new, d)
    prev_g = torch.where(go[:, None], g, prev_g)
    prev_loss = torch.where(go, loss, prev_loss)
    t_first = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
    t = torch.where(go, torch.where(first, t_first, torch.full_like(t, lr)), t)
    # Not a descent direction: torch ends the step without moving, and so do all later steps.
    stuck = go & (_dot(g, d) > -tolerance_change)
    steps = steps + stuck
    it = torch.where(stuck, 0, it)
    status = torch.where(stuck, CONVERGED, status)
    mv = go & ~stuck
    x = torch.where(mv[:, None], x + t[:, None] * d, x)
    # At max_iter torch moves without evaluating and ends the step.
    at_max = mv & (it == max_iter)
    steps = steps + at_max
    it = torch.where(at_max, 0, it)
    status = torch.where(at_max & (steps >= max_steps), BUDGET, status)
    return d, prev_g, prev_loss, t, x, it, steps, status


def _round(run: Tensor, f_new: Tensor, g_new: Tensor, x: Tensor, x_ok: Tensor, status: Tensor, it: Tensor,
           n_iter: Tensor, evals: Tensor, steps: Tensor, closures: Tensor, loss: Tensor, g: Tensor, prev_g: Tensor,
           prev_loss: Tensor, d: Tensor, t: Tensor, h_diag: Tensor, final_loss: Tensor, buf: Tensor, R: Tensor,
           YY: Tensor, hstart: Tensor, hlen: Tensor, limits: tuple) -> tuple[Tensor, ...]:
    """Everything of a round after the closure: the evaluation arrives, the history (``buf``, ``R``,
    ``YY``, ``hstart``, ``hlen``, updated in place) takes the new pair and gives the direction, the
    lanes move. One compiled call per round."""
    (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, final_loss, h_diag, col, start, go, first, push,
     st, y, dots_new) = _arrive(run, f_new, g_new, x, x_ok, status, it, n_iter, evals, steps, closures, loss, g,
                                prev_g, prev_loss, d, t, h_diag, final_loss, limits)
    d_new = _direction(buf, R, YY, hstart, hlen, g, st, y, dots_new, push, go, h_diag)
    d, prev_g, prev_loss, t, x, it, steps, status = _move(go, first, d_new, g, loss, d, prev_g, prev_loss, t, x, it,
                                                          steps, status, limits)
    return (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag, final_loss,
            col, start)


_COMPILED: dict[tuple[str, str], Callable] = {}


def compiled(fn: Callable) -> Callable:
    """A per-round function (``_round``) under ``torch.compile``, or eager; see
    :func:`attacks.compiling.compile_or_eager`. It fuses a few dozen small tensor expressions over
    all lanes into a few kernels around the direction (the C kernel, or batched tensor code)."""
    key = (fn.__name__, os.environ.get("DLG_BENCH_COMPILE", "1"))
    if key not in _COMPILED:
        # The lane count shrinks as lanes stop (see BatchedLBFGS.run): dynamic=None recompiles once
        # with a symbolic lane count instead of once per count.
        _COMPILED[key] = compile_or_eager(fn, what="the L-BFGS update", dynamic=None)
    return _COMPILED[key]


class BatchedLBFGS:
    """Runs ``settings.steps`` L-BFGS steps on N lanes; see the module docstring.

    ``compile``: where the C round does not serve (CUDA, no C compiler, other dtypes), run the
    tensor round under ``torch.compile`` (see :func:`compiled`); it changes speed only, and
    results only by float rounding.
    """

    def __init__(self, settings: LBFGSSettings = LBFGSSettings(), *, compile: bool = True):
        self.s = settings
        self.compile = compile

    def run(
        self,
        closure: BatchedClosure,
        x0: Tensor,
        *,
        slots: int | None = None,
        on_round: Callable[[int], None] | None = None,
        snapshot_steps: tuple[int, ...] = (),
    ) -> LBFGSResult:
        """Optimise from ``x0`` [N, D].

        ``slots``: at most this many lanes advance together (default: all N). The others wait
        in lane order; whenever a lane stops, the next waiting one takes over its slot, so the
        batched closure stays full while lanes stop at very different steps. A lane's
        iterates do not depend on its slot or on which lanes share its rounds.

        ``on_round(steps_done)`` is called after every round with the optimizer steps finished by
        all lanes together (a stopped lane counts all ``steps``, a waiting one none).
        """
        s = self.s
        N, dim = x0.shape
        dev, dt = x0.device, x0.dtype
        S = N if slots is None else max(1, min(int(slots), N))
        # The working set: one row per slot, holding global lane ``act[row]``. While lanes wait,
        # a stopped row is refilled; once none wait, the per-round loop compacts the set when half
        # of it has stopped, so stopped lanes cost nothing (the C loop of rounds_ skips them).
        act = torch.arange(S, device=dev)
        waiting = S  # the next lane to start
        x = x0[:S].detach().clone()
        x_ok = x.clone()
        status = torch.full((S,), RUNNING, dtype=torch.long, device=dev)
        it = torch.zeros(S, dtype=torch.long, device=dev)  # iteration inside the current step; 0 = step start
        n_iter = torch.zeros(S, dtype=torch.long, device=dev)  # torch's state['n_iter']
        evals = torch.zeros(S, dtype=torch.long, device=dev)  # current_evals in this step
        steps = torch.zeros(S, dtype=torch.long, device=dev)
        closures = torch.zeros(S, dtype=torch.long, device=dev)
        loss = torch.zeros(S, dtype=dt, device=dev)
        prev_loss = torch.zeros(S, dtype=dt, device=dev)
        g = torch.zeros(S, dim, dtype=dt, device=dev)
        prev_g = torch.zeros(S, dim, dtype=dt, device=dev)
        d = torch.zeros(S, dim, dtype=dt, device=dev)
        t = torch.zeros(S, dtype=dt, device=dev)
        h_diag = torch.ones(S, dtype=dt, device=dev)
        final_loss = torch.full((S,), float("nan"), dtype=dt, device=dev)
        if lbfgs_kernels.available(x0):  # the CPU: one C call per round, in place, on padded rows
            step, row = lbfgs_kernels.round_, lbfgs_kernels.row_stride(dim, dt)
        else:
            step, row = (compiled(_round) if self.compile else _round), None
        hist = _History(S, s.history_size, dim, dt, dev, row)
        limits = (s.steps, s.lr, s.max_iter, s.eval_budget, s.tolerance_grad, s.tolerance_change)
        # Results by global lane id: written when a lane leaves the working set and at the end.
        out = {"x": x0.detach().clone(), "status": torch.full((N,), RUNNING, dtype=torch.long, device=dev),
               "closures": torch.zeros(N, dtype=torch.long, device=dev),
               "steps": torch.zeros(N, dtype=torch.long, device=dev),
               "final_loss": torch.full((N,), float("nan"), dtype=dt, device=dev)}
        trace = torch.full((N, s.steps), float("nan"), dtype=dt, device=dev)
        rounds = 0
        snaps = x0.detach().unsqueeze(0).repeat(len(snapshot_steps), 1, 1)  # [K, N, D]
        snap_at = torch.tensor(snapshot_steps, dtype=torch.long, device=dev)
        snapped = (snap_at == 0)[:, None].expand(-1, N).contiguous()  # [K, N]: lane's step-k iterate is stored
        # On the CPU with a C objective, rows run LANE_ROUNDS rounds each per C call, one row after
        # the other (see lbfgs_kernels.rounds_); refills wait for the call's end.
        native = getattr(closure, "native", None) if step is lbfgs_kernels.round_ else None

        def store(rows: Tensor) -> None:
            for key, v in (("x", x), ("status", status), ("closures", closures), ("steps", steps),
                           ("final_loss", final_loss)):
                out[key][act[rows]] = v[rows]

        while True:
            run = status == RUNNING
            idx = run.nonzero().squeeze(1)  # the round's one host sync
            if idx.numel() < act.numel() and waiting < N:
                # Refill stopped rows with waiting lanes, each from its own fresh start.
                rows = (~run).nonzero().squeeze(1)[: N - waiting]
                store(rows)
                lanes = torch.arange(waiting, waiting + rows.numel(), device=dev)
                waiting += rows.numel()
                act[rows] = lanes
                x[rows] = x0[lanes].to(dt)
                x_ok[rows] = x[rows]
                for v in (status, it, n_iter, evals, steps, closures, loss, prev_loss, g, prev_g, d, t):
                    v[rows] = 0  # RUNNING == 0
                h_diag[rows] = 1
                final_loss[rows] = float("nan")
                hist.clear(rows)
                run = status == RUNNING
                idx = run.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            if native is None and waiting == N and idx.numel() <= act.numel() // 2:
                store(torch.arange(act.numel(), device=dev))
                act = act[idx]
                (x, x_ok, status, it, n_iter, evals, steps, closures, loss, prev_loss, g, prev_g, d, t, h_diag,
                 final_loss) = (v[idx] for v in (x, x_ok, status, it, n_iter, evals, steps, closures, loss,
                                                 prev_loss, g, prev_g, d, t, h_diag, final_loss))
                hist.take(idx)
                run = torch.ones(idx.numel(), dtype=torch.bool, device=dev)
                idx = torch.arange(idx.numel(), device=dev)
            if native is not None:
                rounds += lbfgs_kernels.rounds_(
                    LANE_ROUNDS, native, act, x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g,
                    prev_loss, d, t, h_diag, final_loss, hist.buf, hist.R, hist.YY, hist.start, hist.len, limits,
                    trace, snap_at, snaps, snapped)
            else:
                f_new, g_new = closure(x if idx.numel() == act.numel() else x[idx], act[idx])
                rounds += 1
                f_new, g_new = f_new.detach().to(dt), g_new.detach().to(dt)
                if idx.numel() < act.numel():  # rows not running keep their values
                    f_new, g_new = loss.index_put((idx,), f_new), g.index_put((idx,), g_new)
                (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag,
                 final_loss, col, start) = step(
                    run, f_new, g_new, x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g,
                    prev_loss, d, t, h_diag, final_loss, hist.buf, hist.R, hist.YY, hist.start, hist.len, limits)
                trace[act, col] = torch.where(start, loss, trace[act, col])
                if snapshot_steps:
                    new = (steps == snap_at[:, None]) & ~snapped[:, act]  # [K, m]; mostly all False
                    if new.any():
                        snaps[:, act] = torch.where(new[:, :, None], x, snaps[:, act])
                        snapped[:, act] |= new
            if on_round is not None:  # lanes that left the working set have finished all their steps
                on_round((waiting - act.numel()) * s.steps + int(torch.where(status == RUNNING, steps, s.steps).sum()))
        store(torch.arange(act.numel(), device=dev))
        x, status = out["x"], out["status"]
        snaps = torch.where(snapped[:, :, None], snaps, x)  # lanes that stopped before step k: their final iterate

        return LBFGSResult(
            x=x,
            status=[STATUS_NAMES[int(v)] for v in status.tolist()],
            closures=out["closures"].cpu(),
            steps=out["steps"].cpu(),
            loss_trace=trace.cpu(),
            final_loss=out["final_loss"].cpu(),
            rounds=rounds,
            snapshots={k: snaps[j].cpu() for j, k in enumerate(snapshot_steps)},
        )

