"""Lane-batched L-BFGS: N independent ``torch.optim.LBFGS`` runs advanced together.

Each lane follows exactly the control flow of ``torch.optim.LBFGS.step`` without a line
search (PyTorch 2.x): the same first step size ``min(1, 1/|g|_1) * lr``, the same
curvature test ``y.s > 1e-10``, the same history eviction, the same scaling
``H_diag = y.s / y.y`` and the same break conditions, in the same order. Lanes only
share the closure evaluation (one batched call per round); every scalar decision is
per lane, so a lane's iterates equal those of a lone ``torch.optim.LBFGS`` run up to
float rounding.

The direction ``d = -H g`` is the two-loop recursion's result computed in its
equivalent matrix form (Byrd, Nocedal & Schnabel 1994): with the history's Gram
products ``s_i.y_k`` and ``y_i.y_k`` kept up to date, each loop becomes one unit
triangular solve of size <= history_size, so every round reads the [N, H, D] history
twice with batched matrix products instead of running 2H dependent vector updates.
Mathematically identical; rounding differs in the last bits.

One "round" evaluates the closure once for every running lane. Where the serial
optimiser would call the closure, the lane waits for the next round; everything in
between (direction, step, stopping tests) is vectorised over lanes.

Statuses: ``running``; ``converged`` (a fixed point of the serial algorithm: its
gradient is below ``tolerance_grad`` at the start of a step, or its direction is no
longer a descent direction, so every further step would change nothing);
``budget`` (all ``steps`` optimizer steps done); ``diverged`` (loss or gradient not
finite: the lane is frozen at its last finite iterate and never touches the others).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

RUNNING, CONVERGED, BUDGET, DIVERGED = 0, 1, 2, 3
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
    rounds: int  # batched closure calls
    snapshots: dict[int, Tensor]  # step k -> [N, D] iterate at the start of step k


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class _History:
    """Per-lane ring buffers of the last H pairs (s, y) and their Gram products.

    S and Y share one [N, 2H, D] buffer so that each round reads the history exactly
    twice: once for all dot products (with g and the new pair), once for ``d``.
    """

    def __init__(self, n: int, H: int, dim: int, dt: torch.dtype, dev: torch.device):
        self.H = H
        self.SYbuf = torch.zeros(n, 2 * H, dim, dtype=dt, device=dev)  # rows: old_stps, then old_dirs
        self.SY = torch.zeros(n, H, H, dtype=dt, device=dev)  # SY[i, k] = s_i . y_k, by slot
        self.YY = torch.zeros(n, H, H, dtype=dt, device=dev)
        self.rho = torch.zeros(n, H, dtype=dt, device=dev)
        self.len = torch.zeros(n, dtype=torch.long, device=dev)
        self.start = torch.zeros(n, dtype=torch.long, device=dev)  # slot of the oldest pair

    def update_and_direction(self, g: Tensor, h_diag: Tensor, push: Tensor, s: Tensor, y: Tensor,
                             ys: Tensor) -> Tensor:
        """Append (s, y) for lanes ``push`` (torch's pop(0) when full), then return the two-loop
        recursion's ``d = -H g`` for every lane. g, s, y: [N, D]; rows of non-pushing lanes of s, y
        are ignored."""
        H = self.H
        n = g.shape[0]
        dev, dt = g.device, g.dtype
        dots = torch.bmm(self.SYbuf, torch.stack([g, y, s], 2))  # [N, 2H, 3], one pass
        lanes = push.nonzero().squeeze(1)
        Sg, Yg = dots[:, :H, 0], dots[:, H:, 0]
        if lanes.numel():
            sl, yl, gl = s[lanes], y[lanes], g[lanes]
            full = self.len[lanes] == H
            slot = (self.start[lanes] + self.len[lanes]) % H
            self.SYbuf[lanes, slot] = sl
            self.SYbuf[lanes, H + slot] = yl
            self.rho[lanes, slot] = 1.0 / ys[lanes]
            self.start[lanes] = torch.where(full, (self.start[lanes] + 1) % H, self.start[lanes])
            self.len[lanes] = torch.where(full, self.len[lanes], self.len[lanes] + 1)
            s_y = dots[lanes, :H, 1]  # s_i . y_new
            y_s = dots[lanes, H:, 2]  # y_k . s_new
            y_y = dots[lanes, H:, 1]  # y_k . y_new
            ar = torch.arange(lanes.numel(), device=dev)
            yy_new = _dot(yl, yl)
            s_y[ar, slot] = ys[lanes]
            y_s[ar, slot] = ys[lanes]
            y_y[ar, slot] = yy_new
            self.SY[lanes, :, slot] = s_y
            self.SY[lanes, slot, :] = y_s
            self.YY[lanes, :, slot] = y_y
            self.YY[lanes, slot, :] = y_y
            Sg[lanes, slot] = _dot(sl, gl)
            Yg[lanes, slot] = _dot(yl, gl)
        m = self.len
        if int(m.max()) == 0:
            return -g * h_diag[:, None]
        pos = torch.arange(H, device=dev)
        order = (self.start[:, None] + pos) % H  # chronological position -> slot
        valid = pos[None, :] < m[:, None]
        Sg, Yg = Sg.gather(1, order), Yg.gather(1, order)
        rho = torch.where(valid, self.rho.gather(1, order), 0.0)
        idx_r = order.unsqueeze(2).expand(n, H, H)
        idx_c = order.unsqueeze(1).expand(n, H, H)
        pair = valid[:, :, None] & valid[:, None, :]
        SY = torch.where(pair, self.SY.gather(1, idx_r).gather(2, idx_c), 0.0)  # chronological s_i . y_k
        YY = torch.where(pair, self.YY.gather(1, idx_r).gather(2, idx_c), 0.0)
        eye = torch.eye(H, dtype=dt, device=dev).expand(n, H, H)
        # First loop, newest to oldest: a_i = rho_i s_i.(-g - sum_{k>i} a_k y_k).
        upper = eye + rho[:, :, None] * torch.triu(SY, 1)
        a = torch.linalg.solve_triangular(upper, (-rho * Sg).unsqueeze(2), upper=True,
                                          unitriangular=True).squeeze(2)
        # r = H_diag q with q = -g - Y^T a; then oldest to newest:
        # c_i = a_i - rho_i y_i.(r + sum_{k<i} c_k s_k).
        yq = -Yg - torch.bmm(YY, a.unsqueeze(2)).squeeze(2)
        lower = eye + rho[:, :, None] * torch.tril(SY.transpose(1, 2), -1)
        c = torch.linalg.solve_triangular(lower, (a - rho * h_diag[:, None] * yq).unsqueeze(2),
                                          upper=False, unitriangular=True).squeeze(2)
        # d = H_diag (-g - Y^T a) + S^T c, coefficients back in slot order; one pass.
        coef = torch.zeros(n, 2 * H, dtype=dt, device=dev)
        coef[:, :H].scatter_(1, order, c)
        coef[:, H:].scatter_(1, order, -a * h_diag[:, None])
        return -g * h_diag[:, None] + torch.bmm(coef.unsqueeze(1), self.SYbuf).squeeze(1)


class BatchedLBFGS:
    """Runs ``settings.steps`` L-BFGS steps on N lanes; see the module docstring."""

    def __init__(self, settings: LBFGSSettings = LBFGSSettings()):
        self.s = settings

    def run(
        self,
        closure: BatchedClosure,
        x0: Tensor,
        *,
        on_round: Callable[[Tensor], None] | None = None,
        snapshot_steps: tuple[int, ...] = (),
    ) -> LBFGSResult:
        """Optimise from ``x0`` [N, D]. ``on_round(steps_done)`` is called after every round with
        each lane's finished step count (``steps`` for stopped lanes)."""
        s = self.s
        n, dim = x0.shape
        dev, dt = x0.device, x0.dtype
        x = x0.detach().clone()
        x_ok = x.clone()
        status = torch.full((n,), RUNNING, dtype=torch.long, device=dev)
        it = torch.zeros(n, dtype=torch.long, device=dev)  # iteration inside the current step; 0 = step start
        n_iter = torch.zeros(n, dtype=torch.long, device=dev)  # torch's state['n_iter']
        evals = torch.zeros(n, dtype=torch.long, device=dev)  # current_evals in this step
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        closures = torch.zeros(n, dtype=torch.long, device=dev)
        loss = torch.zeros(n, dtype=dt, device=dev)
        prev_loss = torch.zeros(n, dtype=dt, device=dev)
        g = torch.zeros(n, dim, dtype=dt, device=dev)
        prev_g = torch.zeros(n, dim, dtype=dt, device=dev)
        d = torch.zeros(n, dim, dtype=dt, device=dev)
        t = torch.zeros(n, dtype=dt, device=dev)
        h_diag = torch.ones(n, dtype=dt, device=dev)
        hist = _History(n, s.history_size, dim, dt, dev)
        trace = torch.full((n, s.steps), float("nan"), dtype=dt, device=dev)
        final_loss = torch.full((n,), float("nan"), dtype=dt, device=dev)
        rounds = 0
        snaps = {k: x.clone() for k in snapshot_steps}
        snapped = {k: torch.full((n,), k == 0, dtype=torch.bool, device=dev) for k in snapshot_steps}

        def end_step(mask: Tensor) -> None:
            steps[mask] += 1
            it[mask] = 0
            status[mask & (steps >= s.steps)] = BUDGET

        def iterate(lanes: Tensor) -> None:
            """The body of torch's ``while n_iter < max_iter`` loop, for ``lanes``."""
            it[lanes] += 1
            n_iter[lanes] += 1
            first = n_iter[lanes] == 1
            gl = g[lanes]
            # Curvature pair from the previous iteration (not on a lane's very first iteration).
            n_all = g.shape[0]
            g_all = torch.zeros_like(g)
            g_all[lanes] = gl
            y = g_all - prev_g
            st = d * t[:, None]
            ys = _dot(y, st)
            later = torch.zeros(n_all, dtype=torch.bool, device=g.device)
            later[lanes[~first]] = True
            push = later & (ys > 1e-10)
            h_diag[push] = ys[push] / _dot(y[push], y[push])
            dl = hist.update_and_direction(g_all, h_diag, push, st, y, ys)[lanes]
            d[lanes] = dl
            prev_g[lanes] = gl
            prev_loss[lanes] = loss[lanes]
            tl = torch.where(first, torch.clamp(1.0 / gl.abs().sum(1), max=1.0) * s.lr,
                             torch.full_like(loss[lanes], s.lr))
            t[lanes] = tl
            # Not a descent direction: torch ends the step without moving, and so do all later steps.
            stuck = _dot(gl, dl) > -s.tolerance_change
            steps[lanes[stuck]] += 1
            it[lanes[stuck]] = 0
            status[lanes[stuck]] = CONVERGED
            mv = lanes[~stuck]
            x[mv] += tl[~stuck, None] * dl[~stuck]
            # At max_iter torch moves without evaluating and ends the step.
            end_step(torch.zeros_like(status, dtype=torch.bool).index_fill_(0, mv[it[mv] == s.max_iter], True))

        while True:
            idx = (status == RUNNING).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            f_new, g_new = closure(x[idx], idx)
            rounds += 1
            closures[idx] += 1
            f_new, g_new = f_new.detach().to(dt), g_new.detach().to(dt)
            finite = torch.isfinite(f_new) & torch.isfinite(g_new).all(1)
            bad = idx[~finite]
            status[bad] = DIVERGED
            x[bad] = x_ok[bad]
            idx, f_new, g_new = idx[finite], f_new[finite], g_new[finite]
            x_ok[idx] = x[idx]
            loss[idx] = f_new
            final_loss[idx] = f_new
            g[idx] = g_new
            opt_cond = torch.zeros(n, dtype=torch.bool, device=dev)
            opt_cond[idx] = g_new.abs().amax(1) <= s.tolerance_grad
            on = torch.zeros(n, dtype=torch.bool, device=dev)
            on[idx] = True
            # Evaluation at the start of a step: its loss is what step() returns.
            start = on & (it == 0)
            trace[start, steps[start].clamp(max=s.steps - 1)] = loss[start]
            evals[start] = 1
            status[start & opt_cond] = CONVERGED  # torch returns at once; every later step repeats this
            steps[start & opt_cond] += 1
            # Evaluation after a move inside a step: torch's break tests.
            inner = on & (it > 0)
            evals[inner] += 1
            brk = inner & (
                (evals >= s.eval_budget)
                | opt_cond
                | ((d * t[:, None]).abs().amax(1) <= s.tolerance_change)
                | ((loss - prev_loss).abs() < s.tolerance_change)
            )
            end_step(brk)  # the next round re-evaluates the same point, as torch's next step() does
            go = ((start & ~opt_cond) | (inner & ~brk)).nonzero().squeeze(1)
            if go.numel():
                iterate(go)
            for k in snapshot_steps:
                new = (steps == k) & ~snapped[k]
                snaps[k][new] = x[new]
                snapped[k] |= new
            if on_round is not None:
                on_round(torch.where(status == RUNNING, steps, s.steps))
        for k in snapshot_steps:  # lanes that stopped before step k keep their final iterate
            snaps[k][~snapped[k]] = x[~snapped[k]]

        return LBFGSResult(
            x=x,
            status=[STATUS_NAMES[int(v)] for v in status.tolist()],
            closures=closures.cpu(),
            steps=steps.cpu(),
            loss_trace=trace.cpu(),
            final_loss=final_loss.cpu(),
            rounds=rounds,
            snapshots={k: v.cpu() for k, v in snaps.items()},
        )
