"""The C objective for sigmoid conv nets (attacks/sigmoid_convnet.c) is DLG's objective: the same value
and gradient as autograd's grad of grad, lane by lane, whatever the lane or thread count."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import attacks.dlg as dlg
from attacks import ATTACKS, AttackBatch, Lane, sigmoid_convnet
from attacks.dlg import victim_gradient
from bench.models import build_model

F64 = torch.float64

if shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip("no C compiler: the vmap objective serves", allow_module_level=True)


class OddChain(nn.Module):
    """Kernel 3 then 4, stride 1 then 3, padding 1 then 0, torch.sigmoid and flatten as functions."""

    def __init__(self, classes: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 5, 3, stride=1, padding=1), nn.Conv2d(5, 3, 4, stride=3, padding=0)
        self.fc = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x):
        return self.fc(torch.flatten(torch.sigmoid(self.b(torch.sigmoid(self.a(x)))), 1))


def _strided(classes: int) -> nn.Module:  # 13 x 13 input, stride 2: 7 x 7 outputs (masked vectors)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(196, classes))


def _pointwise(classes: int) -> nn.Module:  # 1 x 1 kernels widening 2 to 6 channels: u outgrows the unfolded input
    return nn.Sequential(nn.Conv2d(2, 6, 1), nn.Sigmoid(), nn.Flatten(), nn.Linear(150, classes))


def _wide(classes: int) -> nn.Module:  # 40 x 40 input: rows wider than the vector code takes
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.Sigmoid(), nn.Flatten(), nn.Linear(1600, classes))


def _many(classes: int) -> nn.Module:  # 20 output channels (more than a vector's 16); 20-wide rows, stride 1
    return nn.Sequential(nn.Conv2d(3, 20, 5), nn.Sigmoid(), nn.Flatten(), nn.Linear(5120, classes))


MODELS = {  # name: (build(classes, generator), image shape)
    "lenet-dlg": (lambda C, g: build_model("lenet-dlg", num_classes=C, generator=g), (3, 32, 32)),
    "lenet-dlg-gray": (lambda C, g: build_model("lenet-dlg", num_classes=C, channels=1, generator=g), (1, 32, 32)),
    "odd": (lambda C, g: OddChain(C), (2, 11, 11)),
    "strided": (lambda C, g: _strided(C), (3, 13, 13)),
    "wide": (lambda C, g: _wide(C), (1, 40, 40)),
    "pointwise": (lambda C, g: _pointwise(C), (2, 5, 5)),
    "many": (lambda C, g: _many(C), (3, 20, 20)),
}


def _batch(name: str, n: int, B: int, C: int, dtype=F64) -> AttackBatch:
    build, shape = MODELS[name]
    torch.manual_seed(0)  # the models that do not take a generator
    arch = build(C, torch.Generator().manual_seed(0)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    lanes = []
    for lane in range(n):
        model = build(C, torch.Generator().manual_seed(lane)).to(dtype)
        with torch.no_grad():  # distinct weights per lane, also for the models built from the global RNG
            for p in model.parameters():
                p.uniform_(-0.5, 0.5, generator=gen)
        params = {k: v.detach() for k, v in model.named_parameters()}
        images = torch.rand(B, *shape, generator=gen, dtype=dtype)
        labels = torch.randint(0, C, (B,), generator=gen)
        target = victim_gradient(arch, params, images, labels, C)
        # A defended gradient: the dummy pair's gradient never matches it exactly.
        target = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in target.items()}
        lanes.append(Lane(params=params, target_grads=target, seed=lane))
    return AttackBatch(model=arch, image_shape=shape, num_classes=C, batch_size=B, lanes=lanes)


def _both(batch: AttackBatch, label: str, dtype=F64, z_seed: int = 7):
    """(kernel's (grad, value), autograd's (grad, value)) at the same random point."""
    attack = ATTACKS.get(label).make(steps=1, engine="eager", dtype=str(dtype).split(".")[1])
    params, targets, probs = attack._stack(batch, attack._fixed_labels(batch))
    z = torch.randn(attack.initial_point(batch).shape, generator=torch.Generator().manual_seed(z_seed), dtype=dtype)
    kernel = sigmoid_convnet.objective(batch.model, batch.image_shape, batch.batch_size, batch.num_classes,
                                       label == "dlg", dtype, batch.device)
    assert kernel is not None, "the kernel did not build or did not recognise the model"
    reference = attack._lane_objective(batch)  # in float64 whatever the kernel's dtype
    args64 = (z.to(F64), {k: v.to(F64) for k, v in params.items()}, {k: v.to(F64) for k, v in targets.items()},
              probs.to(F64))
    return kernel(z, params, targets, probs), reference(*args64)


CASES = [("lenet-dlg", 1, 10, "dlg"), ("lenet-dlg", 2, 10, "dlg"), ("lenet-dlg", 1, 10, "idlg"),
         ("lenet-dlg", 1, 100, "dlg"), ("lenet-dlg-gray", 1, 10, "dlg"), ("odd", 2, 6, "dlg"),
         ("strided", 1, 5, "dlg"), ("wide", 1, 4, "idlg"), ("pointwise", 2, 3, "dlg"), ("many", 1, 3, "dlg")]


@pytest.mark.parametrize(("name", "B", "C", "label"), CASES)
def test_kernel_is_grad_of_grad_in_float64(name, B, C, label):
    """Value and gradient (image and label logits) equal autograd's to 1e-12 in float64."""
    (g, f), (g_ref, f_ref) = _both(_batch(name, 3, B, C), label)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))


@pytest.mark.parametrize(("name", "B", "C", "label"), CASES)
def test_kernel_in_float32_is_within_rounding(name, B, C, label):
    """float32 (the vector code, where the CPU has it) against float64 autograd: rounding only."""
    batch = _batch(name, 3, B, C, dtype=torch.float32)
    (g, f), (g_ref, f_ref) = _both(batch, label, dtype=torch.float32)
    attack = ATTACKS.get(label).make(steps=1, engine="eager")  # autograd in float32: the yardstick
    params, targets, probs = attack._stack(batch, attack._fixed_labels(batch))
    z = torch.randn(attack.initial_point(batch).shape, generator=torch.Generator().manual_seed(7))
    g32, f32 = attack._lane_objective(batch)(z, params, targets, probs)

    def error(a, b):
        return (a.double() - b).norm(dim=-1) / b.norm(dim=-1)

    assert (error(f[:, None], f_ref[:, None]) <= 4 * error(f32[:, None], f_ref[:, None]) + 1e-6).all()
    assert (error(g, g_ref) <= 4 * error(g32, g_ref) + 1e-5).all()


def test_lanes_do_not_depend_on_each_other_or_the_thread_count():
    """A lane's result is the same, bit for bit, alone or among others, on one thread or two."""
    batch = _batch("lenet-dlg", 5, 1, 10, dtype=torch.float32)
    attack = ATTACKS.get("dlg").make(steps=1)
    params, targets, probs = attack._stack(batch, attack._fixed_labels(batch))
    z = attack.initial_point(batch)
    fn = sigmoid_convnet.objective(batch.model, batch.image_shape, 1, 10, True, torch.float32, batch.device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        g, f = fn(z, params, targets, probs)
        torch.set_num_threads(1)
        g1, f1 = fn(z[1:3], {k: v[1:3] for k, v in params.items()}, {k: v[1:3] for k, v in targets.items()},
                    probs[1:3])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(g[1:3], g1) and torch.equal(f[1:3], f1)


def test_only_sigmoid_chains_are_recognised():
    assert sigmoid_convnet.layout(build_model("lenet-dlg", num_classes=10), (3, 32, 32))[1] == [
        "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "body.4.weight", "body.4.bias",
        "fc.0.weight", "fc.0.bias"]
    for model in (build_model("convnet", num_classes=10), build_model("resnet20", num_classes=10)):
        assert sigmoid_convnet.layout(model, (3, 32, 32)) is None
    others = [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5)),  # not a sigmoid
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 5)),
        nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1, dilation=2), nn.Sigmoid(), nn.Flatten(),
                      nn.Linear(16, 5)),  # the size without dilation is the same 2 x 2
        nn.Sequential(nn.Conv2d(3, 4, (3, 1), padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(320, 5)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.Sigmoid(), nn.Flatten(),
                      nn.Linear(256, 5)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 5, bias=False)),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 5), nn.Sigmoid()),
    ]
    for model in others:  # each model runs on this input: only the named property rules it out
        model(torch.zeros(1, 3, 8, 8))
        assert sigmoid_convnet.layout(model, (3, 8, 8)) is None, model
    assert sigmoid_convnet.layout(_strided(5), (3, 13, 13)) is not None
    assert sigmoid_convnet.layout(_strided(5), (3, 12, 12)) is None  # the Linear does not fit this input


def test_attack_uses_the_kernel_where_it_builds(monkeypatch):
    """lenet-dlg on the CPU gets the kernel; without it (no build, DLG_BENCH_KERNELS=0) the vmap objective."""
    batch = _batch("lenet-dlg", 2, 1, 10, dtype=torch.float32)
    attack = ATTACKS.get("dlg").make(steps=1)
    monkeypatch.setattr(dlg, "_OBJECTIVES", {})
    assert attack._objective(batch)[0].__module__ == "attacks.sigmoid_convnet"
    monkeypatch.setattr(dlg, "_OBJECTIVES", {})
    monkeypatch.setattr(sigmoid_convnet.KERNELS, "libs", {torch.float32: None})
    assert attack._objective(batch)[0].__module__ != "attacks.sigmoid_convnet"


@pytest.mark.parametrize("scale", [30.0, 300.0])
def test_saturated_sigmoids_flush_denormals_within_rounding_and_restore_the_callers_mode(scale):
    """Pixels far outside [0, 1] (as early DLG iterates have) saturate the sigmoids, whose outputs and
    derivatives then fall below float32's normal range; the kernel flushes those to zero (they cost a
    microcode assist each), which stays within float32 rounding of autograd, and leaves the caller's
    denormal mode as it was."""
    batch = _batch("lenet-dlg", 3, 1, 10, dtype=torch.float32)
    attack = ATTACKS.get("dlg").make(steps=1, engine="eager")
    params, targets, probs = attack._stack(batch, attack._fixed_labels(batch))
    z = scale * torch.randn(attack.initial_point(batch).shape, generator=torch.Generator().manual_seed(7))
    kernel = sigmoid_convnet.objective(batch.model, batch.image_shape, 1, 10, True, torch.float32, batch.device)
    g, f = kernel(z, params, targets, probs)
    assert torch.tensor([1e-39]).mul(1.0).item() != 0  # the caller still computes with denormals
    reference = attack._lane_objective(batch)
    g_ref, f_ref = reference(z.double(), {k: v.double() for k, v in params.items()},
                             {k: v.double() for k, v in targets.items()}, probs.double())
    g32, f32 = reference(z, params, targets, probs)

    def error(a, b):
        return (a.double() - b).norm(dim=-1) / b.norm(dim=-1)

    assert (error(f[:, None], f_ref[:, None]) <= 4 * error(f32[:, None], f_ref[:, None]) + 1e-6).all()
    assert (error(g, g_ref) <= 4 * error(g32, g_ref) + 1e-5).all()
