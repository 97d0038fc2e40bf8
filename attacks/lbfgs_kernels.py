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

The kernel is plain C, compiled on first use with the C compiler ``torch.compile`` also needs,
``-march=native``, and cached per source, compiler and CPU. It is a ``torch.library`` custom
op that updates the history in place, so the compiled L-BFGS round calls it like any other
operator without copying the history. Where it cannot be built (no C compiler, no custom-op
API) or does not apply (CUDA, other dtypes), :func:`attacks.lbfgs._direction` computes the same
in tensor operations, rounded in another order. ``DLG_BENCH_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("lbfgs_kernels.c")
_REALS = {torch.float32: "float", torch.float64: "double"}
# Tried in order: the fast build, then the plainest one (e.g. a compiler without OpenMP).
_FLAG_SETS = (["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"], ["-O3"])


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlg-bench" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build(real: str) -> ctypes.CDLL:
    """Compile (or reuse) the kernel for C type ``real``; raises on failure."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), real.encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        lib = _cache_dir() / f"lbfgs_kernels_{real}_{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            # Concurrent workers may build at once: each writes its own file, the rename is atomic.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            cmd = [compiler, *flags, "-shared", "-fPIC", f"-DREAL={real}", str(SOURCE), "-o", tmp]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    errors.append((done.stderr.strip().splitlines() or ["failed"])[-1])
                    continue
                os.replace(tmp, lib)
            except OSError as exc:
                errors.append(str(exc))
                continue
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(str(lib))
        dll.history_direction.restype = None
        dll.history_direction_work.restype = ctypes.c_int64
        dll.history_direction_work.argtypes = [ctypes.c_int64]
        dll.history_direction.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 14 + [ctypes.c_int]
        return dll
    raise RuntimeError(f"{compiler} failed: {'; '.join(errors)}")


# dtype -> the built library, or None where it cannot be built. Filled by :func:`prepare` outside
# compiled code, so that tracing ``available`` is a plain dictionary lookup.
_LIBS: dict[torch.dtype, ctypes.CDLL | None] = {}


def prepare(dtype: torch.dtype) -> bool:
    """Build (or load) the kernel for ``dtype`` once per process; False where it is unavailable."""
    if dtype not in _LIBS:
        _LIBS[dtype] = None
        if os.environ.get("DLG_BENCH_KERNELS", "1") != "0" and hasattr(torch.library, "custom_op") \
                and dtype in _REALS:
            try:
                _LIBS[dtype] = _build(_REALS[dtype])
            except Exception as exc:  # noqa: BLE001 - any build failure means: use tensor operations
                warnings.warn(f"L-BFGS history kernel unavailable ({exc}); using tensor operations", stacklevel=2)
    return _LIBS[dtype] is not None


def available(t: Tensor) -> bool:
    """Whether the C kernel serves tensors like ``t`` (after :func:`prepare`; eager calls prepare)."""
    if not torch.compiler.is_compiling():
        prepare(t.dtype)
    return t.device.type == "cpu" and _LIBS.get(t.dtype) is not None


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


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
        lib = _LIBS[buf.dtype]
        out, work = buf.new_empty(n, D), buf.new_empty(n, lib.history_direction_work(H))
        lib.history_direction(n, H, D, *map(_ptr, (*state, g, s, y, dots_new, push, need, h_diag, out, work)),
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
