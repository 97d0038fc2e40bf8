"""``torch.compile`` with a clean fallback to eager, shared by the attack engine's compiled parts."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch


def compile_or_eager(fn: Callable, *, what: str, dynamic: bool | None, options: dict | None = None) -> Callable:
    """``fn`` under ``torch.compile``; if compiling or running the compiled code fails, warn once and
    run ``fn`` eagerly from then on (same results up to float rounding). ``DLG_BENCH_COMPILE=0``
    returns ``fn`` itself. ``what`` names the function in the warning; ``options`` are inductor settings."""
    if os.environ.get("DLG_BENCH_COMPILE", "1") == "0":
        return fn
    # Lane counts and bucket sizes give a few shapes per function; never fall back for that.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    state = {"fn": torch.compile(fn, dynamic=dynamic, options=options)}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile of {what} failed ({type(exc).__name__}); running it eagerly",
                          stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    return call
