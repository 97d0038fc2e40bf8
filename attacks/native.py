"""Plain C kernels for the CPU: compiled on first use, cached, and optional.

A kernel source is built per C type (``REAL`` = float or double) with the C compiler
``torch.compile`` also needs and ``-march=native``, and cached per source, compiler, flags,
C type and CPU. Where it cannot be built (no C compiler, no ``torch.library`` custom-op API),
its users compute the same in tensor operations; ``DLG_BENCH_KERNELS=0`` turns every kernel off.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_REALS = {torch.float32: "float", torch.float64: "double"}
# Tried in order: the fast build, then the plainest one (e.g. a compiler without OpenMP).
_FLAG_SETS = (["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"], ["-O3"])


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlg-bench" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def build(source: Path, real: str) -> ctypes.CDLL:
    """Compile (or reuse) ``source`` for C type ``real``; raises on failure."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    text = source.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags).encode(), real.encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        lib = cache_dir() / f"{source.stem}_{real}_{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            # Concurrent workers may build at once: each writes its own file, the rename is atomic.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            cmd = [compiler, *flags, "-shared", "-fPIC", f"-DREAL={real}", str(source), "-o", tmp]
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
        return ctypes.CDLL(str(lib))
    raise RuntimeError(f"{compiler} failed: {'; '.join(errors)}")


class Kernels:
    """The kernels of one C source, built per dtype on first use.

    ``declare(lib)`` sets the argument and result types of the library's functions. ``libs``
    maps a dtype to its library, or None where it cannot be built; it is filled by
    :meth:`prepare` outside compiled code, so that tracing :meth:`available` is a lookup.
    """

    def __init__(self, source: Path, what: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.what, self.declare = source, what, declare
        self.libs: dict[torch.dtype, ctypes.CDLL | None] = {}

    def prepare(self, dtype: torch.dtype) -> bool:
        """Build (or load) the library for ``dtype`` once per process; False where it is unavailable."""
        if dtype not in self.libs:
            self.libs[dtype] = None
            if os.environ.get("DLG_BENCH_KERNELS", "1") != "0" and hasattr(torch.library, "custom_op") \
                    and dtype in _REALS:
                try:
                    lib = build(self.source, _REALS[dtype])
                    self.declare(lib)
                    self.libs[dtype] = lib
                except Exception as exc:  # noqa: BLE001 - any build failure means: use tensor operations
                    warnings.warn(f"{self.what} unavailable ({exc}); using tensor operations", stacklevel=3)
        return self.libs[dtype] is not None

    def available(self, t: Tensor) -> bool:
        """Whether the kernels serve tensors like ``t`` (after :meth:`prepare`; eager calls prepare)."""
        if not torch.compiler.is_compiling():
            self.prepare(t.dtype)
        return t.device.type == "cpu" and self.libs.get(t.dtype) is not None


def ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass(frozen=True)
class LaneObjective:
    """A C objective one lane at a time, for :func:`attacks.lbfgs_kernels.rounds_`: ``fn(ctx, lane, z,
    grad, value, work)`` with ``work`` a [work_per_thread] scratch of its own per thread; ``keep``
    holds the tensors ``ctx`` points into."""

    fn: ctypes.c_void_p
    ctx: ctypes.Array
    work_per_thread: int
    dtype: torch.dtype
    keep: tuple
