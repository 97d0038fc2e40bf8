"""DLG's objective and its gradient for a sigmoid conv net, as one C kernel on the CPU.

A *sigmoid conv net* is a chain ``x -> Conv2d -> Sigmoid -> ... -> Conv2d -> Sigmoid -> flatten
-> Linear`` (every Conv2d square, with bias, zero padding, no dilation or groups; the Linear
with bias), as the DLG reference code's LeNet (``lenet-dlg``). For such a model
``sigmoid_convnet.c`` computes, lane by lane, exactly what :meth:`attacks.dlg.DLGAttack._lane_objective`
asks autograd for: the forward pass; the dummy pair's weight gradient G (backward pass, the soft
cross-entropy's ``delta = (softmax(o) sum_c p_c - p) / B`` at the logits); the distance
``D = sum over tensors ||G - T||^2``; and dD/dx, dD/d(label logits), by differentiating the backward
and then the forward pass by hand (with ``Gbar = 2 (G - T)``, ``u_l = e_l * s'(z_l)`` the
backward pass's pre-activation gradient and ``e_l`` its activation gradient:
``ubar_l = conv(a_{l-1}, Gbar_l) + gbar_l + conv(ebar_{l-1}, W_l)``, ``ebar_l = ubar_l * s'(z_l)``,
``abar_l += ubar_l * e_l * (1 - 2 a_l)``, then the forward pass's adjoint, where ``a_{l-1}`` feeds
both z_l (through W_l) and G_l (through u_l)). Every convolution is an unfolded-input matrix
product; blocks of them are AVX-512 code where the compiler targets it.

Why: ``vmap`` over grad of grad runs each lane's 19 small convolutions as oneDNN grouped
convolutions plus inductor's elementwise kernels; the kernel does the same arithmetic in one pass
per lane, with the lane's data in cache. It matches autograd to float rounding (tests: float64
to 1e-12; float32 within 4x of float32 autograd's own error), and its results do not depend on the
lane count or thread count. Each lane runs with denormal numbers flushed to zero (x86's FTZ and DAZ,
the caller's mode restored): saturated sigmoids of early DLG iterates (pixels far outside [0, 1])
make values below 1.2e-38, each of which cost a microcode assist, 20 % of the kernel's time in
``bench perf``; flushed, the results stay within float32 rounding of autograd's (tested).
Where it does not apply (another model, CUDA, a dtype other than float32/float64, no C
compiler, ``DLG_BENCH_KERNELS=0``) the attack uses the ``vmap`` objective.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from attacks.native import Kernels, LaneObjective, ptr


def _declare(lib: ctypes.CDLL) -> None:
    lib.sigmoid_convnet_work.restype = ctypes.c_int64
    lib.sigmoid_convnet_work.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.sigmoid_convnet_bound_size.restype = ctypes.c_int64
    lib.sigmoid_convnet_bound_size.argtypes = []
    lib.sigmoid_convnet_bind.restype = None
    lib.sigmoid_convnet_bind.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 3)
    lib.sigmoid_convnet.restype = None
    lib.sigmoid_convnet.argtypes = ([ctypes.c_int64] * 2 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
                                    + [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_int])


KERNELS = Kernels(Path(__file__).with_name("sigmoid_convnet.c"), "sigmoid conv net kernel", _declare)


def _square(v) -> int | None:
    v = (v, v) if isinstance(v, int) else tuple(v)
    return v[0] if len(v) == 2 and v[0] == v[1] else None


def layout(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[Tensor, list[str]] | None:
    """(layer table [L * 9]: ci, co, k, stride, pad, h, w, ho, wo per convolution; parameter names
    in the kernel's order) for a sigmoid conv net of this input shape, else None."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable: not a chain this kernel knows
        return None
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or len(nodes) < 4:
        return None
    modules = dict(model.named_modules())
    prev, rows, names = placeholders[0], [], []
    c, h, w = image_shape
    i = 0
    while i + 1 < len(nodes) and nodes[i].op == "call_module" and isinstance(modules.get(nodes[i].target), nn.Conv2d):
        conv, act = modules[nodes[i].target], nodes[i + 1]
        k, s, p = _square(conv.kernel_size), _square(conv.stride), conv.padding
        p = None if isinstance(p, str) else _square(p)
        is_sigmoid = ((act.op == "call_module" and isinstance(modules.get(act.target), nn.Sigmoid))
                      or (act.op == "call_function" and act.target is torch.sigmoid))
        if (None in (k, s, p) or conv.groups != 1 or _square(conv.dilation) != 1 or conv.bias is None
                or conv.padding_mode != "zeros" or conv.in_channels != c or not is_sigmoid
                or nodes[i].args != (prev,) or nodes[i].kwargs or act.args != (nodes[i],) or act.kwargs
                or len(nodes[i].users) != 1 or len(act.users) != 1):
            return None
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if ho < 1 or wo < 1:
            return None
        rows.append([c, conv.out_channels, k, s, p, h, w, ho, wo])
        names += [f"{nodes[i].target}.weight", f"{nodes[i].target}.bias"]
        c, h, w, prev, i = conv.out_channels, ho, wo, act, i + 2
    if not rows or len(rows) > 8 or len(nodes) != i + 2:
        return None
    flat, fc = nodes[i], nodes[i + 1]
    module = modules.get(flat.target) if flat.op == "call_module" else None
    flattens = ((flat.op == "call_method" and flat.target == "flatten" and flat.args == (prev, 1))
                or (flat.op == "call_function" and flat.target is torch.flatten and flat.args == (prev, 1))
                or (isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
                    and flat.args == (prev,)))
    linear = modules.get(fc.target) if fc.op == "call_module" else None
    if not (flattens and not flat.kwargs and isinstance(linear, nn.Linear) and linear.bias is not None
            and fc.args == (flat,) and not fc.kwargs and linear.in_features == c * h * w):
        return None
    return torch.tensor(rows, dtype=torch.int64).flatten(), names + [f"{fc.target}.weight", f"{fc.target}.bias"]


def objective(model: nn.Module, image_shape: tuple[int, int, int], batch_size: int, classes: int, soft: bool,
              dtype: torch.dtype, device: torch.device) -> Callable | None:
    """The batched objective (z, params, targets, fixed_probs) -> (dD/dz [n, Dz], D [n]) of
    :meth:`attacks.dlg.DLGAttack._lane_objective`, computed by the kernel; None where it does not apply."""
    found = layout(model, image_shape)
    if found is None or device.type != "cpu" or not KERNELS.prepare(dtype):
        return None
    spec, names = found
    lib, layers = KERNELS.libs[dtype], spec.numel() // 9
    per_thread = lib.sigmoid_convnet_work(layers, ptr(spec), batch_size, classes)
    scratch: dict[int, Tensor] = {}

    def call(z: Tensor, params: dict[str, Tensor], targets: dict[str, Tensor], fixed: Tensor) -> tuple[Tensor, Tensor]:
        threads = torch.get_num_threads()
        if threads not in scratch:  # per thread, reused: a lane's scratch stays in cache
            scratch[threads] = torch.empty(threads, per_thread, dtype=dtype)
        z, fixed = z.contiguous(), fixed.contiguous()
        weights = [params[k].contiguous() for k in names]
        wanted = [targets[k].contiguous() for k in names]
        n, dz = z.shape
        grad, value = z.new_empty(n, dz), z.new_empty(n)
        lib.sigmoid_convnet(n, layers, ptr(spec), batch_size, classes, dz, ptr(z), int(soft), ptr(fixed),
                            (ctypes.c_void_p * len(names))(*(t.data_ptr() for t in weights)),
                            (ctypes.c_void_p * len(names))(*(t.data_ptr() for t in wanted)),
                            ptr(grad), ptr(value), ptr(scratch[threads]), threads)
        return grad, value

    def bind(params: dict[str, Tensor], targets: dict[str, Tensor], fixed: Tensor) -> LaneObjective:
        """The objective of lane i = the i-th row of every tensor, one lane at a time (see
        :func:`attacks.lbfgs_kernels.rounds_`)."""
        keep = (fixed.contiguous(), *(params[k].contiguous() for k in names), *(targets[k].contiguous() for k in names))
        weights, wanted = keep[1:1 + len(names)], keep[1 + len(names):]
        ctx = (ctypes.c_char * lib.sigmoid_convnet_bound_size())()
        lib.sigmoid_convnet_bind(ctx, layers, ptr(spec), batch_size, classes, int(soft), ptr(keep[0]),
                                 (ctypes.c_void_p * len(names))(*(t.data_ptr() for t in weights)),
                                 (ctypes.c_void_p * len(names))(*(t.data_ptr() for t in wanted)))
        return LaneObjective(ctypes.cast(lib.sigmoid_convnet_lane, ctypes.c_void_p), ctx, per_thread, dtype, keep)

    call.bind = bind
    return call
