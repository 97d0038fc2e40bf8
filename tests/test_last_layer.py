"""A final Linear layer's gradient in closed form, and its weight's match term in one pass, give
the objective autograd's grad of grad gives."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import attacks.dlg as dlg
from attacks import ATTACKS, AttackBatch, Lane, last_layer
from attacks.dlg import split_last_linear, victim_gradient
from bench.models import build_model

F64 = torch.float64


@pytest.fixture(params=["C-kernel", "tensors"])
def kernel(request, monkeypatch):
    """Both forms of the term: the C kernel must build wherever a C compiler is present (as on CI)."""
    if request.param == "C-kernel":
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("no C compiler: the tensor form serves")
        assert last_layer.KERNELS.prepare(F64), "the last-layer kernel did not build"
    else:
        monkeypatch.setattr(last_layer.KERNELS, "libs", {F64: None})
    return request.param


@pytest.mark.parametrize("B", [1, 3])
def test_weight_match_is_the_square_sum_and_its_derivatives(B, kernel):
    """Value and derivatives against autograd of the written-out expression, per lane under vmap."""
    gen = torch.Generator().manual_seed(B)
    n, C, Fd = 4, 7, 37  # 37: not a multiple of the kernel's vector width
    delta, h, target = (torch.randn(*s, generator=gen, dtype=F64) for s in ((n, B, C), (n, B, Fd), (n, C, Fd)))

    def plain(d, x, t):
        return ((d.T @ x - t) ** 2).sum()

    want = vmap(grad(plain, argnums=(0, 1)))(delta, h, target)
    got = vmap(grad(last_layer.weight_match, argnums=(0, 1)))(delta, h, target)
    value = vmap(last_layer.weight_match)(delta, h, target)
    torch.testing.assert_close(value, vmap(plain)(delta, h, target), rtol=1e-12, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_match_kernel_equals_tensor_form_in_float32():
    """The C kernel (float32, lanes over threads) against the tensor form, LFW-sized rows."""
    if not last_layer.KERNELS.prepare(torch.float32):
        pytest.skip("no C kernel here")
    gen = torch.Generator().manual_seed(0)
    delta, h, target = (torch.randn(*s, generator=gen) for s in ((3, 1, 641), (3, 1, 768), (3, 641, 768)))
    got, want = last_layer._match(delta, h, target), last_layer.match_tensors(delta, h, target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-4)


def test_split_gives_the_features_and_the_last_linear():
    model = build_model("convnet", num_classes=5, size=8)
    features, weight, bias = split_last_linear(model)
    assert (weight, bias) == ("classifier.2.weight", "classifier.2.bias")
    x = torch.randn(2, 3, 8, 8)
    W, b = model.classifier[2].weight, model.classifier[2].bias
    torch.testing.assert_close(features(x) @ W.T + b, model(x), rtol=0, atol=0)
    assert "classifier.2.weight" not in dict(features.named_parameters())
    no_linear_end = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Sigmoid())
    assert split_last_linear(no_linear_end) is None


def _batch(model_name: str, B: int, C: int = 6, size: int = 8, device: str = "cpu") -> AttackBatch:
    gen = torch.Generator().manual_seed(B)
    arch = build_model(model_name, num_classes=C, size=size).to(F64)
    lanes = []
    for lane in range(3):
        model = build_model(model_name, num_classes=C, size=size, generator=torch.Generator().manual_seed(lane))
        params = {k: v.detach().to(F64) for k, v in model.named_parameters()}
        images = torch.rand(B, 3, size, size, generator=gen, dtype=F64)
        labels = torch.randint(0, C, (B,), generator=gen)
        lanes.append(Lane(params=params, target_grads=victim_gradient(arch, params, images, labels, C), seed=lane))
    return AttackBatch(model=arch.to(device), image_shape=(3, size, size), num_classes=C, batch_size=B, lanes=lanes,
                       device=torch.device(device))


@pytest.mark.parametrize(("model_name", "B", "label"),
                         [("lenet-dlg", 1, "dlg"), ("lenet-dlg", 1, "idlg"), ("lenet-dlg", 2, "dlg"),
                          ("convnet", 2, "dlg")])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_closed_form_last_layer_equals_grad_of_grad(model_name, B, label, device, monkeypatch):
    """The objective with the last layer in closed form equals autograd's grad of grad (float64),
    value and gradient, at random points: it is the same attack (on CUDA: the term's tensor form)."""
    batch = _batch(model_name, B, device=device)
    attack = ATTACKS.get(label).make(steps=1, engine="eager", dtype="float64")
    params, targets, probs = attack._stack(batch, attack._fixed_labels(batch))
    z = torch.randn(attack.initial_point(batch).shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    z = z.to(device)
    assert split_last_linear(batch.model) is not None
    g_split, f_split = attack._lane_objective(batch)(z, params, targets, probs)
    monkeypatch.setitem(dlg._SPLITS, batch.model, None)  # as for a model that does not end in a Linear
    g_auto, f_auto = attack._lane_objective(batch)(z, params, targets, probs)
    torch.testing.assert_close(f_split, f_auto, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_split, g_auto, rtol=1e-10, atol=1e-12 * float(g_auto.abs().max()))
