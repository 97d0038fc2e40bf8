"""``torch.compile`` with a clean fallback to eager, shared by the attack engine's compiled parts."""

from __future__ import annotations

import collections
import functools
import operator
import os
import warnings
from collections.abc import Callable

import torch

# Calls that ran eagerly after a compile failure, by reason (one line naming the function and the
# error), in this process: the runner records them with each unit's results, so a run that fell back
# says so in run.json and its reports instead of only in a warning that scrolled by.
_EAGER_CALLS: collections.Counter[str] = collections.Counter()


def eager_calls() -> dict[str, int]:
    """How many calls ran eagerly after a compile failure so far in this process, by reason."""
    return dict(_EAGER_CALLS)


def eager_since(before: dict[str, int]) -> list[str]:
    """The reasons of the eager calls made since ``before`` (an :func:`eager_calls` snapshot)."""
    return sorted(k for k, v in _EAGER_CALLS.items() if v > before.get(k, 0))


def compile_or_eager(fn: Callable, *, what: str, dynamic: bool | None, options: dict | None = None) -> Callable:
    """``fn`` under ``torch.compile``; if compiling or running the compiled code fails, warn once and
    run ``fn`` eagerly from then on (same results up to float rounding), counted in
    :func:`eager_calls`. ``DLG_BENCH_COMPILE=0`` returns ``fn`` itself. ``what`` names the function
    in the warning; ``options`` are inductor settings.
    Inductor's own CPU kernels run on one thread (library calls such as convolutions still use all of
    torch's threads), which keeps results bit-identical whatever the thread count."""
    if os.environ.get("DLG_BENCH_COMPILE", "1") == "0":
        return fn
    # Lane counts and bucket sizes give a few shapes per function; never fall back for that.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Single-threaded CPU kernels: with more threads inductor splits some reductions over them, and
    # a run's results would depend on the thread count (--workers, a worker's threads raised late).
    options = {"cpp.threads": 1, **(options or {})}
    compiled = torch.compile(fn, dynamic=dynamic, options=options)
    state: dict[str, str | None] = {"reason": None}

    def call(*args):
        if state["reason"] is None:
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                detail = (str(exc).strip().splitlines() or [""])[0][:160]
                state["reason"] = (f"torch.compile of {what} failed ({type(exc).__name__}: {detail}); it ran "
                                   "eagerly: same results up to float rounding, slower")
                warnings.warn(f"torch.compile of {what} failed ({type(exc).__name__}); running it eagerly",
                              stacklevel=2)
        _EAGER_CALLS[state["reason"]] += 1
        return fn(*args)

    return call


MATVEC_MIN = 32 * 1024  # floats per lane's matrix; CIFAR-100's 100 x 768 and up


@functools.cache
def cpu_rewrite_pass() -> object | None:
    """An inductor post-grad pass for the CPU's float32 convolutions and matrix-vector products of
    the double backward, or None where this torch has no custom-pass hook. Three rewrites, each the
    same linear map:

    - A strided transposed convolution becomes the input gradient of the matching convolution
      (``aten.convolution_backward``; the transposed convolution *is* that gradient, the output
      shape fixes ``output_padding``). oneDNN runs the gradient form about twice as fast here:
      on one thread, 32 lanes of ``lenet-dlg``, 0.97 -> 0.47 ms for the first layer's and
      0.54 -> 0.32 ms for the second layer's input gradient. Stride-1 ones gained nothing.
    - An input gradient alone (output mask [True, False, False]) reads only the shape of its
      ``input`` argument, yet oneDNN first copies that argument into the channels-last layout
      the layout optimisation gives every convolution: 0.1-0.2 ms per call for the expanded
      or contiguous tensors autograd passes there. It gets an empty channels-last tensor.
    - A batched matrix-vector product (``bmm`` of [n, 1, K] and [n, K, N], or of [n, M, K] and
      [n, K, 1]: a final Linear layer's products per lane, under ``vmap``) becomes ``baddbmm`` with
      ``beta = 0``. Inductor lowers such a ``bmm`` on the CPU as a multiply and a sum, fused into the
      loops that produce its operands, which then recompute them for every block of outputs; the
      library call reads the matrix once. One thread: LFW (641 classes), 12 lanes, 15.3 -> 11.4 ms
      per objective call; CIFAR-100, 20 lanes, 9.8 -> 8.8 ms. Only where a lane's matrix holds at
      least ``MATVEC_MIN`` floats: CIFAR-10's 768 x 10 gained nothing measurable, and the rewrite
      would only have changed its rounding.

    float64 (no layout optimisation, see :func:`attacks.dlg.compile_objective`) and CUDA are
    left alone.
    """
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    except ImportError:
        return None

    conv, grad = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default
    bmm, baddbmm = torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default
    input_only = [True, False, False]

    def on_cpu_f32(val: object) -> bool:
        return isinstance(val, torch.Tensor) and val.device.type == "cpu" and val.dtype == torch.float32

    def channels_last_like(val: torch.Tensor) -> torch.Tensor:
        with val.fake_mode:
            return torch.empty(val.shape, dtype=val.dtype, device=val.device, memory_format=torch.channels_last)

    def empty_node(graph: torch.fx.Graph, like: torch.Tensor) -> torch.fx.Node:
        """A node (inserted at the graph's insertion point) for an uninitialised tensor laid out as ``like``."""
        node = graph.call_function(torch.ops.aten.empty_strided.default, (list(like.shape), list(like.stride())),
                                   {"dtype": like.dtype, "device": like.device})
        node.meta["val"] = like
        return node

    class CpuRewrites(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not bmm:
                    continue
                a, b = node.args
                out = node.meta.get("val")
                if not on_cpu_f32(out) or (out.shape[1] != 1 and out.shape[2] != 1):
                    continue
                if max(a.meta["val"][0].numel(), b.meta["val"][0].numel()) < MATVEC_MIN:
                    continue
                with out.fake_mode:
                    like = torch.empty((1, 1, 1), dtype=out.dtype, device=out.device)
                with graph.inserting_before(node):  # beta = 0: baddbmm never reads its first argument
                    unread = empty_node(graph, like)
                    new = graph.call_function(baddbmm, (unread, a, b), {"beta": 0})
                new.meta["val"] = out
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not conv:
                    continue
                x, w, bias, stride, padding, dilation, transposed, _, groups = node.args
                out = node.meta.get("val")
                if not transposed or bias is not None or not on_cpu_f32(out) or max(stride) == 1:
                    continue
                args = (stride, padding, dilation, False, [0, 0], groups, input_only)
                try:  # shapes first: on any surprise, leave the node as it is
                    like = channels_last_like(out)
                    with out.fake_mode:
                        both_val = grad(x.meta["val"], like, w.meta["val"], None, *args)
                except Exception:  # noqa: BLE001
                    continue
                if both_val[0].shape != out.shape:
                    continue
                with graph.inserting_before(node):
                    both = graph.call_function(grad, (x, empty_node(graph, like), w, None, *args))
                    new = graph.call_function(operator.getitem, (both, 0))
                both.meta["val"], new.meta["val"] = both_val, both_val[0]
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not grad or list(node.args[-1]) != input_only:
                    continue
                inp = node.args[1]
                val = inp.meta.get("val") if isinstance(inp, torch.fx.Node) else None
                if not on_cpu_f32(val) or val.is_contiguous(memory_format=torch.channels_last):
                    continue
                with graph.inserting_before(node):
                    node.replace_input_with(inp, empty_node(graph, channels_last_like(val)))

        def uuid(self) -> object:
            # Part of inductor's cache key. The last-layer operator's file too: its fake kernel shapes
            # the compiled graphs, and a cache kept across a change to it ran stale code.
            return get_hash_for_files((__file__, os.path.join(os.path.dirname(__file__), "last_layer.py")))

    return CpuRewrites()
