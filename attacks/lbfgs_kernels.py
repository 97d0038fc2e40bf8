"""A lane-batched L-BFGS round's direction as one C kernel on the CPU (``lbfgs_kernels.c``).

Each round reads every lane's [2H, D] history twice (see :mod:`attacks.lbfgs`): pass 1 dots
it with g and y, pass 2 combines its rows; between them lies the two-loop recursion's small
algebra on [H, H] matrices. ``history_direction`` does all three, lane by lane (OpenMP over
lanes; a lane's result does not depend on the other lanes or on the thread count), and skips the
lanes whose direction the round does not use. On one thread of this project's 2-core AMD EPYC,
32 lanes of ``lenet-dlg`` (79 MB of history):

- pass 1 takes 2.4 ms (33 GB/s) against 4.9 ms as MKL's ``bmm``, pass 2 with the write of
  the new pair 2.0 ms against 2.8-3.0 ms as ``baddbmm``;
- the algebra takes 0.3-0.4 ms, against about 1.7 ms as compiled tensor code (rolls of R and
  YY, two batched triangular solves, a batched matrix-vector product).

Each lane's pass 2 follows its pass 1 at once, and pass 1 walks the rows backwards, so pass 2
starts on the rows pass 1 read last (every sum is taken in the same order as before, so results
are bit for bit unchanged): on the Intel Xeon of 2026-11-27 (2 MB of L2 per core) a 32-lane
direction took 5.4-5.8 ms instead of 6.5-6.8 ms on one thread.

The kernel is built and cached by :mod:`attacks.native`. It is a ``torch.library`` custom op
that updates the history in place, so the compiled L-BFGS round calls it like any other
operator without copying the history. Where it cannot be built or does not apply (CUDA, other
dtypes), :func:`attacks.lbfgs._direction` computes the same in tensor operations, rounded in
another order.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from attacks.native import Kernels, ptr


def _declare(lib: ctypes.CDLL) -> None:
    lib.history_direction.restype = None
    lib.history_direction_work.restype = ctypes.c_int64
    lib.history_direction_work.argtypes = [ctypes.c_int64]
    lib.history_direction.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 14 + [ctypes.c_int]


KERNELS = Kernels(Path(__file__).with_name("lbfgs_kernels.c"), "L-BFGS history kernel", _declare)
prepare, available = KERNELS.prepare, KERNELS.available


if hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("dlg_bench::history_direction", mutates_args=("buf", "R", "YY", "start", "length"))
    def _direction_op(buf: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, g: Tensor, s: Tensor,
                      y: Tensor, dots_new: Tensor, push: Tensor, need: Tensor, h_diag: Tensor) -> Tensor:
        state = (buf, R, YY, start, length)
        assert all(t.is_contiguous() for t in state)  # updated in place
        assert all(t.dtype == buf.dtype for t in (R, YY, g, s, y, dots_new, h_diag))  # read as one C type
        assert push.dtype == need.dtype == torch.bool  # read as bytes
        g, s, y, dots_new, push, need, h_diag = (t.contiguous() for t in (g, s, y, dots_new, push, need, h_diag))
        n, H, D = buf.shape[0], R.shape[1], buf.shape[2]
        lib = KERNELS.libs[buf.dtype]
        out, work = buf.new_empty(n, D), buf.new_empty(n, lib.history_direction_work(H))
        lib.history_direction(n, H, D, *map(ptr, (*state, g, s, y, dots_new, push, need, h_diag, out, work)),
                              torch.get_num_threads())
        return out

    @_direction_op.register_fake
    def _(buf: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, g: Tensor, s: Tensor, y: Tensor,
          dots_new: Tensor, push: Tensor, need: Tensor, h_diag: Tensor) -> Tensor:
        return buf.new_empty(buf.shape[0], buf.shape[2])


def direction(buf: Tensor, R: Tensor, YY: Tensor, start: Tensor, length: Tensor, g: Tensor, s: Tensor, y: Tensor,
              dots_new: Tensor, push: Tensor, need: Tensor, h_diag: Tensor) -> Tensor:
    """The C kernel behind :func:`attacks.lbfgs._direction` (same arguments, same in-place updates)."""
    return torch.ops.dlg_bench.history_direction(buf, R, YY, start, length, g, s, y, dots_new, push, need, h_diag)
