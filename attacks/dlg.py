"""DLG (Zhu, Liu & Han, NeurIPS 2019) and iDLG (Zhao, Mopuri & Bilen, 2020).

DLG, as in the paper's reference code: the dummy image ~ N(0, 1) and dummy label logits
~ N(0, 1) (soft label = softmax of the logits) are optimised jointly with
``torch.optim.LBFGS(lr=1, max_iter=20, history_size=100, line_search_fn=None)`` for
300 steps, minimising

    D = sum over parameter tensors of || dL(x', y')/dW - g_shared ||_2^2,
    L(x', y') = mean over the batch of sum_c -softmax(y')_c * log_softmax(f(x'))_c.

iDLG reads the label of a single image off the shared gradient of the last layer
(the only row of the final weight gradient whose sum is negative, ``argmin``), then
optimises the image alone against plain cross-entropy with that label; otherwise as DLG.

Lanes run in one batched computation driven by :class:`attacks.lbfgs.BatchedLBFGS`. On the CPU,
for a chain of Conv2d-sigmoid layers ending in a Linear (``lenet-dlg``), the gradient-matching
loss and its gradient come from one C kernel (:mod:`attacks.sigmoid_convnet`); otherwise from
``torch.func.vmap`` over the loss and its gradient (grad of grad), optionally ``torch.compile``d,
where a final Linear layer's gradient is written out and its weight's match term taken in one
pass (:mod:`attacks.last_layer`). Either way the value and gradient are autograd's, up to float
rounding. Each lane has its own weights, target gradient and seed, and no quantity is shared
across lanes. ``engine="serial"`` is the paper's code itself (``torch.optim.LBFGS`` on one lane
at a time), kept as the reference.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

from attacks import sigmoid_convnet
from attacks.base import ATTACKS, AttackBatch, AttackKind, AttackResult
from attacks.compiling import compile_or_eager, cpu_rewrite_pass
from attacks.last_layer import weight_match
from attacks.lbfgs import BatchedLBFGS, LBFGSSettings
from bench.errors import UserError

ENGINES = ("compiled", "eager", "serial")


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """The reference code's ``cross_entropy_for_onehot``: mean_b sum_c -p_bc log softmax(z)_bc."""
    return torch.mean(torch.sum(-target_probs * F.log_softmax(logits, dim=-1), dim=-1))


def victim_gradient(model: torch.nn.Module, params: dict[str, Tensor], images: Tensor,
                    labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The gradient a worker shares: d soft_cross_entropy(f(x), onehot(y)) / dW, by parameter name."""
    onehot = F.one_hot(labels, num_classes).to(images.dtype)

    def loss(p):
        return soft_cross_entropy(functional_call(model, p, (images,)), onehot)

    return {k: v.detach() for k, v in grad(loss)(params).items()}


def idlg_labels(target_grads: dict[str, Tensor], last_weight: str) -> Tensor:
    """iDLG's label: argmin over classes of the row sums of the last layer's weight gradient."""
    return torch.argmin(target_grads[last_weight].sum(-1), dim=-1).reshape(1)


@dataclass(frozen=True)
class DLGAttack:
    """See the module docstring. ``label`` is "soft" (DLG) or "idlg"."""

    name: str
    label: str
    lbfgs: LBFGSSettings
    engine: str = "compiled"
    dtype: torch.dtype = torch.float32

    # -- the per-lane objective ------------------------------------------------------
    def _lane_objective(self, batch: AttackBatch) -> Callable:
        """The batched objective: vmap over lanes of the gradient-matching loss and its gradient.

        (z [n, Dz], params, targets, fixed_probs [n, B, C]) -> (dD/dz [n, Dz], D [n]); for DLG the
        label probabilities come from z and ``fixed_probs`` is unused. A model that ends in a Linear
        layer gets that layer's gradient in closed form (see :func:`split_last_linear`), any other
        autograd's grad of grad throughout.
        """
        model, shape, B, C = batch.model, batch.image_shape, batch.batch_size, batch.num_classes
        n_img = B * shape[0] * shape[1] * shape[2]
        names = list(batch.lanes[0].params)
        idlg = self.label == "idlg"
        split = split_last_linear(model)

        def generic(x: Tensor, probs: Tensor, params: dict, targets: dict) -> Tensor:
            def loss(p):
                return soft_cross_entropy(functional_call(model, p, (x,)), probs)

            g = grad(loss)(params)
            return sum(((g[k] - targets[k]) ** 2).sum() for k in names)

        def last_linear(x: Tensor, probs: Tensor, params: dict, targets: dict) -> Tensor:
            """The same value: for logits = h W^T + b and L = soft_cross_entropy, dL/dlogits is
            delta = (softmax(logits) sum_c p_c - p) / B, so dL/dW = delta^T h, dL/db = sum_b delta_b,
            and dL/dh = delta W continues into the features' backward pass (a vjp)."""
            features, weight, bias = split
            inner = [k for k in names if k not in (weight, bias)]
            h, backward = vjp(lambda p: functional_call(features, p, (x,)), {k: params[k] for k in inner})
            W = params[weight]
            logits = h @ W.T if bias is None else h @ W.T + params[bias]
            delta = (F.softmax(logits, dim=-1) * probs.sum(-1, keepdim=True) - probs) / B
            (g,) = backward(delta @ W)
            total = sum(((g[k] - targets[k]) ** 2).sum() for k in inner) + weight_match(delta, h, targets[weight])
            return total if bias is None else total + ((delta.sum(0) - targets[bias]) ** 2).sum()

        match = generic if split is None else last_linear

        def objective(z: Tensor, params: dict, targets: dict, fixed_probs: Tensor) -> Tensor:
            x = z[:n_img].reshape(B, *shape)
            probs = fixed_probs if idlg else F.softmax(z[n_img:].reshape(B, C), dim=-1)
            return match(x, probs, params, targets)

        return vmap(grad_and_value(objective), in_dims=(0, 0, 0, 0))

    def _objective(self, batch: AttackBatch) -> tuple[Callable, bool]:
        """The batched objective for this architecture and shape, made (and compiled) once per process,
        and whether its lane count must be padded to a bucket (:func:`bucket_size`): the C kernel
        where it applies (any lane count), else the vmap objective (padded)."""
        key = (repr(batch.model), batch.image_shape, batch.batch_size, batch.num_classes, self.label,
               self.dtype, str(batch.device), self.engine)
        if key not in _OBJECTIVES:
            fn = sigmoid_convnet.objective(batch.model, batch.image_shape, batch.batch_size, batch.num_classes,
                                           self.label == "soft", self.dtype, batch.device)
            if fn is not None:
                _OBJECTIVES[key] = fn, False
            else:
                fn = self._lane_objective(batch)
                _OBJECTIVES[key] = (compile_objective(fn, self.dtype) if self.engine == "compiled" else fn), True
        return _OBJECTIVES[key]

    def _stack(self, batch: AttackBatch, fixed_labels: Tensor):
        """Lane-stacked weights, targets and (iDLG) one-hot label probabilities, on the device."""
        dev, dt = batch.device, self.dtype
        params = {k: torch.stack([ln.params[k] for ln in batch.lanes]).to(dev, dt) for k in batch.lanes[0].params}
        targets = {k: torch.stack([ln.target_grads[k] for ln in batch.lanes]).to(dev, dt)
                   for k in batch.lanes[0].target_grads}
        return params, targets, F.one_hot(fixed_labels, batch.num_classes).to(dev, dt)

    def initial_point(self, batch: AttackBatch) -> Tensor:
        """Per lane: dummy image ~ N(0,1) then (DLG) label logits ~ N(0,1), from the lane's seed."""
        B, C = batch.batch_size, batch.num_classes
        rows = []
        for ln in batch.lanes:
            gen = torch.Generator().manual_seed(ln.seed)
            img = torch.randn((B, *batch.image_shape), generator=gen, dtype=self.dtype)
            parts = [img.flatten()]
            if self.label == "soft":
                parts.append(torch.randn((B, C), generator=gen, dtype=self.dtype).flatten())
            rows.append(torch.cat(parts))
        return torch.stack(rows).to(batch.device)

    def _fixed_labels(self, batch: AttackBatch) -> Tensor:
        if self.label != "idlg":
            return torch.zeros(len(batch.lanes), batch.batch_size, dtype=torch.long)
        last = list(batch.lanes[0].params)[-2]  # the final Linear's weight
        return torch.stack([idlg_labels(ln.target_grads, last) for ln in batch.lanes])

    # -- running -----------------------------------------------------------------------
    def __call__(self, batch: AttackBatch, *, progress: Callable[[float], None] | None = None,
                 snapshot_steps: tuple[int, ...] = ()) -> AttackResult:
        if self.label == "idlg" and batch.batch_size != 1:
            raise UserError(f"attack {self.name!r}: iDLG's label rule needs victim batch size 1, "
                            f"got {batch.batch_size}; use attack 'dlg'")
        t0 = time.perf_counter()
        fixed = self._fixed_labels(batch)
        with full_precision(batch.device):
            run = self._run_serial if self.engine == "serial" else self._run_batched
            x, status, closures, rounds, trace, final, snaps = run(batch, fixed, progress, snapshot_steps)
        B, C = batch.batch_size, batch.num_classes
        n_img = B * batch.image_shape[0] * batch.image_shape[1] * batch.image_shape[2]
        recs = x[:, :n_img].reshape(len(batch.lanes), B, *batch.image_shape)
        if self.label == "soft":
            labels = x[:, n_img:].reshape(len(batch.lanes), B, C).argmax(-1)
        else:
            labels = fixed
        return AttackResult(
            reconstructions=recs.detach().cpu().float(), labels=labels.cpu(), loss_trace=trace,
            closures=closures, status=status, seconds=time.perf_counter() - t0, final_loss=final, rounds=rounds,
            snapshots={k: v.reshape(len(batch.lanes), B, *batch.image_shape) for k, v in snaps.items()},
        )

    def _run_batched(self, batch, fixed, progress, snapshot_steps):
        params, targets, fixed = self._stack(batch, fixed)
        objective, pads = self._objective(batch)
        n = len(batch.lanes)
        slots = min(batch.slots or n, n)
        # Per-slot copies of each running lane's weights, targets and label: gathered once when
        # a lane takes a slot, not every round.
        held: dict = {"lanes": None}

        def closure(z: Tensor, lanes: Tensor) -> tuple[Tensor, Tensor]:
            k = lanes.numel()
            size = bucket_size(k, slots) if pads else k
            if size > k:  # pad with copies of a running lane so compiled shapes stay few
                lanes = torch.cat([lanes, lanes[:1].expand(size - k)])
                z = torch.cat([z, z[:1].expand(size - k, -1)])
            if held["lanes"] is None or held["lanes"].numel() != size:
                held.update(p={kk: v[lanes] for kk, v in params.items()},
                            t={kk: v[lanes] for kk, v in targets.items()}, f=fixed[lanes])
            else:
                rows = (lanes != held["lanes"]).nonzero().squeeze(1)  # slots taken over by another lane
                if rows.numel():
                    for kk, v in params.items():
                        held["p"][kk][rows] = v[lanes[rows]]
                    for kk, v in targets.items():
                        held["t"][kk][rows] = v[lanes[rows]]
                    held["f"][rows] = fixed[lanes[rows]]
            held["lanes"] = lanes
            g, f = objective(z, held["p"], held["t"], held["f"])
            return f[:k], g[:k]

        if hasattr(objective, "bind"):  # a C objective: the engine may run it lane after lane
            closure.native = objective.bind(params, targets, fixed)

        n_img = batch.batch_size * batch.image_shape[0] * batch.image_shape[1] * batch.image_shape[2]
        state = {"last": 0}

        def on_round(done: int) -> None:
            if done > state["last"]:
                progress((done - state["last"]) / n)
                state["last"] = done

        optimizer = BatchedLBFGS(self.lbfgs, compile=self.engine == "compiled")
        res = optimizer.run(closure, self.initial_point(batch), slots=slots,
                            on_round=None if progress is None else on_round, snapshot_steps=snapshot_steps)
        snaps = {k: v[:, :n_img].float() for k, v in res.snapshots.items()}
        return res.x.detach().cpu(), res.status, res.closures, res.rounds, res.loss_trace, res.final_loss, snaps

    def _run_serial(self, batch, fixed, progress, snapshot_steps):
        """The reference code: one lane at a time, nn.Module autograd, ``torch.optim.LBFGS``."""
        s = self.lbfgs
        B, C, shape = batch.batch_size, batch.num_classes, batch.image_shape
        n_img = B * shape[0] * shape[1] * shape[2]
        z0 = self.initial_point(batch)
        xs, statuses, closures, traces, finals = [], [], [], [], []
        snaps: dict[int, list[Tensor]] = {k: [] for k in snapshot_steps}
        model = batch.model.to(batch.device, self.dtype)
        for lane_i, ln in enumerate(batch.lanes):
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(ln.params[k])
            targets = [ln.target_grads[k].to(batch.device, self.dtype) for k, _ in model.named_parameters()]
            dummy = z0[lane_i, :n_img].reshape(B, *shape).clone().requires_grad_(True)
            variables = [dummy]
            if self.label == "soft":
                dummy_label = z0[lane_i, n_img:].reshape(B, C).clone().requires_grad_(True)
                variables.append(dummy_label)
            opt = torch.optim.LBFGS(variables, lr=s.lr, max_iter=s.max_iter, max_eval=s.max_eval,
                                    tolerance_grad=s.tolerance_grad, tolerance_change=s.tolerance_change,
                                    history_size=s.history_size)
            count = [0]
            probs_fixed = F.one_hot(fixed[lane_i], C).to(batch.device, self.dtype)

            def closure():
                opt.zero_grad()
                probs = F.softmax(variables[1], dim=-1) if self.label == "soft" else probs_fixed
                loss = soft_cross_entropy(model(dummy), probs)
                dy_dx = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
                diff = sum(((gx - gy) ** 2).sum() for gx, gy in zip(dy_dx, targets))
                diff.backward()
                count[0] += 1
                return diff

            trace = torch.full((s.steps,), float("nan"), dtype=self.dtype)
            status = "budget"
            for step in range(s.steps):
                if step in snaps:
                    snaps[step].append(dummy.detach().cpu().flatten().clone())
                loss = float(opt.step(closure).detach())
                trace[step] = loss
                if not torch.isfinite(torch.tensor(loss)):
                    status = "diverged"
                    break
            for k in snaps:
                if len(snaps[k]) <= lane_i:
                    snaps[k].append(dummy.detach().cpu().flatten().clone())
            if progress is not None:
                progress(s.steps / len(batch.lanes))
            z = torch.cat([v.detach().flatten() for v in variables]).cpu()
            xs.append(z)
            statuses.append(status)
            closures.append(count[0])
            traces.append(trace)
            finite = trace[~trace.isnan()]
            finals.append(finite[-1] if finite.numel() else torch.tensor(float("nan"), dtype=self.dtype))
        return (torch.stack(xs), statuses, torch.tensor(closures), sum(closures), torch.stack(traces),
                torch.stack(finals), {k: torch.stack(v) for k, v in snaps.items()})


_OBJECTIVES: dict[tuple, tuple[Callable, bool]] = {}


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """No TF32 on CUDA while attacking: the paper's float32 is meant, and cuDNN may pick TF32
    convolutions (10-bit mantissa) by default on Ampere and later. For lenet-dlg on an H200
    (torch 2.11) the iterates were identical either way; other models and shapes may differ."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def bucket_size(running: int, lanes: int) -> int:
    """Closure batch size for ``running`` of ``lanes`` lanes: lanes, lanes/2, lanes/4 or lanes/8,
    and never 1.

    Stopped lanes drop out of the computation, but each new shape costs a compilation, so
    running lanes are padded up to one of four sizes. A lane computed alone would run its
    convolutions ungrouped, which rounds differently from the same lane among others.
    """
    size = lanes
    for _ in range(3):
        half = -(-size // 2)
        if running > half:
            break
        size = half
    return max(size, 2)


def compile_objective(fn: Callable, dtype: torch.dtype = torch.float32) -> Callable:
    """``torch.compile`` the batched objective with static shapes (faster code; :func:`bucket_size`
    bounds the number of shapes), falling back to eager if compiling fails; see :func:`compile_or_eager`.

    float64 turns off inductor's channels-last layout optimisation: with it, torch 2.14 on the
    CPU computed a wrong per-lane weight gradient for the second convolution (35 % off; float32
    was right, and is faster with it). ``test_compiled_objective_agrees_with_eager`` checks both.
    Convolution gradients and matrix-vector products run in faster, equivalent forms; see
    :func:`attacks.compiling.cpu_rewrite_pass`.
    """
    options: dict = {"layout_optimization": False} if dtype == torch.float64 else {}
    if (rewrite := cpu_rewrite_pass()) is not None:
        options["post_grad_custom_post_pass"] = rewrite
    return compile_or_eager(fn, what="the attack objective", dynamic=False, options=options)


def split_last_linear(model: torch.nn.Module) -> tuple[torch.nn.Module, str, str | None] | None:
    """(features, weight name, bias name or None) for a model whose output is a Linear layer applied
    to the output of everything before it (``features``, sharing the model's modules and parameter
    names); None for any other model, or one ``torch.fx`` cannot trace."""
    if model not in _SPLITS:
        _SPLITS[model] = _split(model)
    return _SPLITS[model]


def _split(model: torch.nn.Module) -> tuple[torch.nn.Module, str, str | None] | None:
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable: the generic objective serves
        return None
    out = next(n for n in traced.graph.nodes if n.op == "output")
    last = out.args[0]
    if not (isinstance(last, torch.fx.Node) and last.op == "call_module" and len(last.users) == 1
            and isinstance(traced.get_submodule(last.target), torch.nn.Linear)
            and len(last.args) == 1 and not last.kwargs and isinstance(last.args[0], torch.fx.Node)):
        return None
    linear = traced.get_submodule(last.target)
    out.args = (last.args[0],)
    traced.graph.erase_node(last)
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, f"{last.target}.weight", None if linear.bias is None else f"{last.target}.bias"


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make(label: str, name: str):
    def make(*, steps: int = 300, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
             tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, engine: str = "compiled",
             dtype: str = "float32") -> DLGAttack:
        if engine not in ENGINES:
            raise UserError(f"attack.engine: unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
        for key, val in (("steps", steps), ("max_iter", max_iter), ("history_size", history_size)):
            if not isinstance(val, int) or val < 1:
                raise UserError(f"attack.{key}: must be a positive integer, got {val!r}")
        if not lr > 0:
            raise UserError(f"attack.lr: must be > 0, got {lr!r}")
        if dtype not in ("float32", "float64"):
            raise UserError(f"attack.dtype: must be float32 or float64, got {dtype!r}")
        settings = LBFGSSettings(steps=steps, lr=lr, max_iter=max_iter, history_size=history_size,
                                 tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)
        return DLGAttack(name=name, label=label, lbfgs=settings, engine=engine, dtype=getattr(torch, dtype))

    return make


_DEFAULTS = {"steps": 300, "lr": 1.0, "max_iter": 20, "history_size": 100, "tolerance_grad": 1e-7,
             "tolerance_change": 1e-9, "engine": "compiled", "dtype": "float32"}
ATTACKS.register("dlg", AttackKind("dlg", "DLG: joint image + soft-label L-BFGS gradient matching",
                                   _make("soft", "dlg"), _DEFAULTS))
ATTACKS.register("idlg", AttackKind("idlg", "iDLG: label from the last layer's gradient, then DLG on the image",
                                    _make("idlg", "idlg"), _DEFAULTS))
