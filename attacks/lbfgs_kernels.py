"""A lane-batched L-BFGS round as one C call on the CPU (``lbfgs_kernels.c``).

:func:`round_` is :func:`attacks.lbfgs._round` (the evaluation arrives, the history takes the new
pair and gives the direction, the lane moves) lane by lane, in place (OpenMP over lanes; a lane's
result does not depend on the other lanes or on the thread count). Its direction reads the lane's
[2H, D] history twice (see :mod:`attacks.lbfgs`): pass 1 dots it with g and y, pass 2 combines
its rows; between them lies the two-loop recursion's small algebra on [H, H] matrices. Here the
rows are padded to whole 64-byte lines (:func:`row_stride`): no vector load straddles two lines.
On one thread of this project's 2-core AMD EPYC, 32 lanes of ``lenet-dlg`` (79 MB of history):

- pass 1 took 2.4 ms (33 GB/s) against 4.9 ms as MKL's ``bmm``, pass 2 with the write of
  the new pair 2.0 ms against 2.8-3.0 ms as ``baddbmm``;
- the algebra took 0.3-0.4 ms, against about 1.7 ms as compiled tensor code (rolls of R and
  YY, two batched triangular solves, a batched matrix-vector product).

Each lane's pass 2 follows its pass 1 at once, and pass 1 walks the rows backwards, so pass 2
starts on the rows pass 1 read last: on the Intel Xeon of 2026-11-27 (2 MB of L2 per core) a
32-lane direction took 5.4-5.8 ms instead of 6.5-6.8 ms on one thread.

The rest of the round (tests, step sizes, moves: a few passes over D floats per lane) had been
a ``torch.compile``-d tensor function around the direction; as C it costs a few percent of the
round instead of 0.5 ms per round of guards, wrappers and kernel launches (``bench perf``, 2
workers of 12 lanes, Intel Xeon: 0.412-0.422 against 0.429-0.468 ms per lane-closure per worker).

:func:`rounds_` goes one step further where the objective is C too (a
:class:`attacks.native.LaneObjective`): each lane runs up to ``count`` whole rounds (its
evaluation, then the update above) before the next lane's turn. A round reads the history
backwards (pass 1) and then forwards (pass 2), so the lane's next round starts on the rows its
last pass left in L2; interleaved over 12 lanes, each round reads the whole history from L3.
One core of the Intel Xeon reads L3 at 24-27 GB/s and L2 at 80-110 GB/s (these passes as plain C
loops), and pass 1 and 2 of 12 lanes of 2.5 MB took 0.15-0.16 ms per lane-round interleaved
against 0.10-0.11 with 4 to 64 rounds per lane in a row (a C benchmark of the two passes alone).

The kernels are built and cached by :mod:`attacks.native`. Where they cannot be built or do
not apply (CUDA, other dtypes), :class:`attacks.lbfgs.BatchedLBFGS` runs the tensor round
(compiled or eager), which rounds in another order.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from attacks.native import Kernels, LaneObjective, ptr


def _declare(lib: ctypes.CDLL) -> None:
    lib.kernel_work.restype = ctypes.c_int64
    lib.kernel_work.argtypes = [ctypes.c_int64] * 2
    lib.history_row.restype = ctypes.c_int64
    lib.history_row.argtypes = [ctypes.c_int64]
    lib.history_direction.restype = None
    lib.history_direction.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 14 + [ctypes.c_int]
    lib.lbfgs_round.restype = None
    lib.lbfgs_round.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 29 + [ctypes.c_int]
    lib.lbfgs_rounds.restype = None
    lib.lbfgs_rounds.argtypes = ([ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p]
                                 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 22 + [ctypes.c_int64]
                                 + [ctypes.c_void_p] * 7 + [ctypes.c_int])


KERNELS = Kernels(Path(__file__).with_name("lbfgs_kernels.c"), "L-BFGS kernel", _declare)
prepare, available = KERNELS.prepare, KERNELS.available
_WORK: dict[tuple, Tensor] = {}
_LIMITS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _work(like: Tensor, H: int, D: int) -> Tensor:
    """Per-thread scratch, reused across rounds (a fresh one per round would be allocated and faulted in)."""
    threads = torch.get_num_threads()
    key = (threads, H, D, like.dtype)
    if key not in _WORK:
        _WORK[key] = like.new_empty(threads, KERNELS.libs[like.dtype].kernel_work(H, D))
    return _WORK[key]


def row_stride(D: int, dtype: torch.dtype) -> int:
    """The floats per history row the kernels expect: D rounded up to whole 64-byte lines, so that
    every row starts on a cache line (the padding is never read; it stays 0)."""
    return int(KERNELS.libs[dtype].history_row(D))


def _check_rows(buf: Tensor, D: int) -> None:
    if buf.shape[2] != row_stride(D, buf.dtype):
        raise ValueError(f"history rows of {buf.shape[2]} floats; the kernels need row_stride({D}) = "
                         f"{row_stride(D, buf.dtype)} (allocate _History with that row)")


def _limits(limits: tuple) -> tuple[Tensor, Tensor]:
    """(steps, max_iter, eval budget) as int64 and (lr, tolerance_grad, tolerance_change) as double, cached."""
    if limits not in _LIMITS:
        max_steps, lr, max_iter, eval_budget, tolerance_grad, tolerance_change = limits
        _LIMITS[limits] = (torch.tensor([max_steps, max_iter, eval_budget], dtype=torch.long),
                           torch.tensor([lr, tolerance_grad, tolerance_change], dtype=torch.float64))
    return _LIMITS[limits]


def direction(buf: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, g: Tensor, s: Tensor, y: Tensor,
              dots_new: Tensor, push: Tensor, need: Tensor, h_diag: Tensor) -> Tensor:
    """The direction alone, as :func:`round_` computes it (same arguments and in-place updates as
    :func:`attacks.lbfgs._direction`, but ``buf``'s rows padded to :func:`row_stride`); the tests
    check it against torch.optim.LBFGS's two-loop recursion."""
    state = (buf, R, YY, start, length)
    assert all(t.is_contiguous() for t in state)  # updated in place
    assert all(t.dtype == buf.dtype for t in (R, YY, g, s, y, dots_new, h_diag))  # read as one C type
    assert push.dtype == need.dtype == torch.bool  # read as bytes
    n, H, D = buf.shape[0], R.shape[1], g.shape[1]
    _check_rows(buf, D)
    out = buf.new_empty(n, D)
    inputs = (t.contiguous() for t in (g, s, y, dots_new, push, need, h_diag))
    KERNELS.libs[buf.dtype].history_direction(n, H, D, *map(ptr, (*state, *inputs, out, _work(buf, H, D))),
                                              torch.get_num_threads())
    return out


def round_(run: Tensor, f_new: Tensor, g_new: Tensor, x: Tensor, x_ok: Tensor, status: Tensor, it: Tensor,
           n_iter: Tensor, evals: Tensor, steps: Tensor, closures: Tensor, loss: Tensor, g: Tensor, prev_g: Tensor,
           prev_loss: Tensor, d: Tensor, t: Tensor, h_diag: Tensor, final_loss: Tensor, buf: Tensor, R: Tensor,
           YY: Tensor, hstart: Tensor, hlen: Tensor, limits: tuple) -> tuple[Tensor, ...]:
    """:func:`attacks.lbfgs._round` as one C call: the lanes' state is updated in place and returned
    in ``_round``'s order, with the trace column and step-start flag of every lane."""
    state = (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag,
             final_loss, buf, R, YY, hstart, hlen)
    assert all(v.is_contiguous() for v in state) and run.dtype == torch.bool  # updated in place; bytes
    assert all(v.dtype == torch.long for v in (status, it, n_iter, evals, steps, closures, hstart, hlen))
    assert all(v.dtype == x.dtype for v in (f_new, g_new, *state[:2], *state[8:19]))  # read as one C type
    n, H, D = x.shape[0], R.shape[1], x.shape[1]
    _check_rows(buf, D)
    col, start = status.new_empty(n), run.new_empty(n)
    ilim, flim = _limits(limits)
    KERNELS.libs[x.dtype].lbfgs_round(
        n, H, D, *map(ptr, (run.contiguous(), f_new.contiguous(), g_new.contiguous(), x, x_ok, status, it, n_iter,
                            evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag, final_loss, buf, R, YY,
                            hstart, hlen, col, start, ilim, flim, _work(x, H, D))), torch.get_num_threads())
    return (x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag, final_loss,
            col, start)


_OBJECTIVE_WORK: dict[tuple, Tensor] = {}


def rounds_(count: int, objective: LaneObjective, act: Tensor, x: Tensor, x_ok: Tensor, status: Tensor, it: Tensor,
            n_iter: Tensor, evals: Tensor, steps: Tensor, closures: Tensor, loss: Tensor, g: Tensor, prev_g: Tensor,
            prev_loss: Tensor, d: Tensor, t: Tensor, h_diag: Tensor, final_loss: Tensor, buf: Tensor, R: Tensor,
            YY: Tensor, hstart: Tensor, hlen: Tensor, limits: tuple, trace: Tensor, snap_steps: Tensor,
            snaps: Tensor, snapped: Tensor) -> int:
    """Up to ``count`` rounds (evaluation, then :func:`round_`'s update) of every running row, row
    after row, in one C call: row r is attack ``act[r]`` of the ``objective``. Each row's state is
    updated in place; at a step start its loss goes to ``trace[act[r], step]``; when its step count
    first reaches ``snap_steps[j]`` its iterate goes to ``snaps[j, act[r]]`` (``snapped`` [K, lanes]
    marks it). Returns the most rounds any row ran."""
    state = (act, x, x_ok, status, it, n_iter, evals, steps, closures, loss, g, prev_g, prev_loss, d, t, h_diag,
             final_loss, buf, R, YY, hstart, hlen, trace, snap_steps, snaps, snapped)
    assert all(v.is_contiguous() for v in state) and snapped.dtype == torch.bool  # in place; bytes
    assert all(v.dtype == torch.long for v in (act, status, it, n_iter, evals, steps, closures, hstart, hlen,
                                               snap_steps))
    assert all(v.dtype == x.dtype == objective.dtype for v in (x_ok, loss, g, prev_g, prev_loss, d, t, h_diag,
                                                               final_loss, buf, R, YY, trace, snaps))
    n, H, D = x.shape[0], R.shape[1], x.shape[1]
    _check_rows(buf, D)
    threads = torch.get_num_threads()
    key = (threads, objective.work_per_thread, x.dtype)
    if key not in _OBJECTIVE_WORK:
        _OBJECTIVE_WORK[key] = x.new_empty(threads, objective.work_per_thread)
    ilim, flim = _limits(limits)
    most = torch.zeros(1, dtype=torch.long)
    KERNELS.libs[x.dtype].lbfgs_rounds(
        count, objective.fn, objective.ctx, ptr(_OBJECTIVE_WORK[key]), objective.work_per_thread, ptr(act),
        trace.shape[0], n, H, D, *map(ptr, state[1:22]), ptr(trace), snap_steps.numel(), ptr(snap_steps),
        ptr(snaps), ptr(snapped), ptr(ilim), ptr(flim), ptr(_work(x, H, D)), ptr(most), threads)
    return int(most)
