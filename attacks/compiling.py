"""``torch.compile`` with a clean fallback to eager, shared by the attack engine's compiled parts."""

from __future__ import annotations

import functools
import operator
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


@functools.cache
def transposed_conv_pass() -> object | None:
    """An inductor post-grad pass that computes strided transposed convolutions on the CPU as the
    input gradient of the matching convolution (``aten.convolution_backward``), or None where this
    torch has no custom-pass hook.

    The two are the same linear map (the transposed convolution *is* that gradient; the output
    shape fixes ``output_padding``), but oneDNN runs the gradient form about twice as fast here:
    measured on one thread, 32 lanes of ``lenet-dlg``, 0.97 -> 0.47 ms for the first layer's and
    0.54 -> 0.32 ms for the second layer's input gradient, which the double backward of DLG
    needs every closure. Stride-1 ones gained nothing and are left alone, as are float64 and CUDA.
    """
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    except ImportError:
        return None

    conv, grad = torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default

    class TransposedConvAsInputGradient(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not conv:
                    continue
                x, w, bias, stride, padding, dilation, transposed, _, groups = node.args
                out = node.meta.get("val")
                if (not transposed or bias is not None or out is None or out.device.type != "cpu"
                        or out.dtype != torch.float32 or max(stride) == 1):
                    continue
                args = (stride, padding, dilation, False, [0, 0], groups, [True, False, False])
                try:  # shapes first: on any surprise, leave the node as it is
                    with out.fake_mode:
                        like_val = torch.empty(out.shape, dtype=out.dtype, device=out.device,
                                               memory_format=torch.channels_last)
                        both_val = grad(x.meta["val"], like_val, w.meta["val"], None, *args)
                except Exception:  # noqa: BLE001
                    continue
                if both_val[0].shape != out.shape:
                    continue
                with graph.inserting_before(node):
                    # convolution_backward reads only the shape (and layout) of its ``input``.
                    like = graph.call_function(torch.ops.aten.empty.memory_format, (list(out.shape),),
                                               {"dtype": out.dtype, "device": out.device,
                                                "memory_format": torch.channels_last})
                    both = graph.call_function(grad, (x, like, w, None, *args))
                    new = graph.call_function(operator.getitem, (both, 0))
                like.meta["val"], both.meta["val"], new.meta["val"] = like_val, both_val, both_val[0]
                node.replace_all_uses_with(new)
                graph.erase_node(node)

        def uuid(self) -> object:
            return get_hash_for_files((__file__,))

    return TransposedConvAsInputGradient()
