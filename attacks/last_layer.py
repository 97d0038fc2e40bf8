"""The gradient-match term of a final Linear layer's weight, in one pass over its target.

For a model ending in ``logits = h W^T + b`` and a victim batch of B images, the weight's
gradient is ``G = sum_b delta_b h_b^T`` ([C, F]; ``delta`` = dL/dlogits, ``h`` the layer's
input), and DLG's objective holds ``||G - T||^2`` for the shared gradient ``T``. Autograd
forms G, then the difference, its square sum, and in the outer derivative the products with
h and delta: several passes over [C, F] per lane, which dominate a round when C is large
(LFW's 641 classes: a [641, 768] target per lane). :func:`weight_match` forms each row of
``R = G - T`` once and returns the same value, with the same derivatives

    d/d delta_bc = 2 R_c . h_b,        d/d h_b = 2 sum_c delta_bc R_c,

on the CPU as one C kernel (``last_layer.c``, built by :mod:`attacks.native`), elsewhere as
tensor operations. R is formed as a difference, never expanded (|G|^2 - 2 G.T + |T|^2 would
cancel catastrophically near a match, where it matters). The value is the same up to float
rounding; the term is differentiated once (the outer derivative), which a custom operator
with a vmap rule supports under ``torch.func`` and ``torch.compile``: the derivatives enter
through ``value + gd . (delta - delta.detach()) + gh . (h - h.detach())``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from attacks.native import Kernels, ptr


def _declare(lib: ctypes.CDLL) -> None:
    lib.weight_match.restype = None
    lib.weight_match.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 7 + [ctypes.c_int]


KERNELS = Kernels(Path(__file__).with_name("last_layer.c"), "last-layer match kernel", _declare)


def match_tensors(delta: Tensor, h: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The term and its derivatives in tensor operations: delta [n, B, C], h [n, B, F], target [n, C, F]
    -> (||R||^2 [n], dD/d delta [n, B, C], dD/dh [n, B, F]) with R = sum_b delta_b h_b^T - target."""
    r = torch.einsum("nbc,nbf->ncf", delta, h) - target
    return (r * r).sum((1, 2)), 2 * torch.einsum("ncf,nbf->nbc", r, h), 2 * torch.einsum("nbc,ncf->nbf", delta, r)


def _match(delta: Tensor, h: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not (delta.device.type == "cpu" and h.dtype == target.dtype == delta.dtype and KERNELS.prepare(delta.dtype)):
        return match_tensors(delta, h, target)
    delta, h, target = delta.contiguous(), h.contiguous(), target.contiguous()
    (n, B, C), F = delta.shape, h.shape[2]
    value, gd, gh, work = delta.new_empty(n), delta.new_empty(delta.shape), h.new_empty(h.shape), h.new_empty(n, F)
    KERNELS.libs[delta.dtype].weight_match(n, B, C, F, *map(ptr, (delta, h, target, value, gd, gh, work)),
                                           torch.get_num_threads())
    return value, gd, gh


if hasattr(torch.library, "custom_op"):
    _match_op = torch.library.custom_op("dlg_bench::linear_weight_match", mutates_args=())(_match)

    @_match_op.register_fake
    def _(delta: Tensor, h: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Contiguous, as the kernel returns them (empty_like would copy strides of a non-contiguous
        # h, as vmap passes for victim batches B > 1, and the compiled code's checks then fail).
        return delta.new_empty(delta.shape[0]), delta.new_empty(delta.shape), h.new_empty(h.shape)

    def _vmap_rule(info, in_dims, delta: Tensor, h: Tensor, target: Tensor):
        """Lanes of a vmap become more leading rows of the operator's own lane dimension."""
        def lanes_first(t: Tensor, dim: int | None) -> Tensor:
            t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.flatten(0, 1)

        m = info.batch_size
        value, gd, gh = _match_op(*(lanes_first(t, d) for t, d in zip((delta, h, target), in_dims)))
        return (value.reshape(m, -1), gd.reshape(m, -1, *gd.shape[1:]), gh.reshape(m, -1, *gh.shape[1:])), (0, 0, 0)

    _match_op.register_vmap(_vmap_rule)
else:  # no custom-op API: the tensor form, differentiated by autograd as usual
    _match_op = None


def weight_match(delta: Tensor, h: Tensor, target: Tensor) -> Tensor:
    """``|| sum_b delta_b h_b^T - target ||^2`` for one lane (delta [B, C], h [B, F], target [C, F]),
    differentiable in delta and h (once); see the module docstring."""
    if _match_op is None:
        return match_tensors(delta[None], h[None], target[None])[0][0]
    value, gd, gh = _match_op(delta.detach()[None], h.detach()[None], target[None])
    return value[0] + (gd[0] * (delta - delta.detach())).sum() + (gh[0] * (h - h.detach())).sum()
