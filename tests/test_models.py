import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from bench.errors import UserError
from bench.models import MODELS, ModelSpec, build_model, count_parameters


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_registry_contents():
    assert MODELS.names() == ["convnet", "lenet-dlg", "resnet20"]
    for name in MODELS.names():
        spec = MODELS.get(name)
        assert isinstance(spec, ModelSpec)
        assert spec.name == name
        assert spec.trainable is True
        assert spec.description
    assert "slow" in MODELS.get("lenet-dlg").description


def test_unknown_model_is_user_error():
    with pytest.raises(UserError, match="unknown model 'vgg'.*allowed: convnet, lenet-dlg, resnet20"):
        build_model("vgg", num_classes=10)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"num_classes": 10, "channels": 0}, {"num_classes": 2.5}])
def test_bad_arguments_are_user_errors(bad):
    with pytest.raises(UserError):
        build_model("lenet-dlg", **bad)


# ----------------------------------------------------------------------------- lenet-dlg


def test_lenet_dlg_layers_exact():
    model = build_model("lenet-dlg", num_classes=100, channels=3, generator=gen())
    body = model.body
    assert len(body) == 6
    for i, (cin, stride) in zip((0, 2, 4), ((3, 2), (12, 2), (12, 1))):
        conv = body[i]
        assert isinstance(conv, nn.Conv2d)
        assert conv.in_channels == cin and conv.out_channels == 12
        assert conv.kernel_size == (5, 5)
        assert conv.stride == (stride, stride)
        assert conv.padding == (2, 2)
        assert conv.bias is not None
        assert isinstance(body[i + 1], nn.Sigmoid)
    (fc,) = model.fc
    assert isinstance(fc, nn.Linear)
    assert (fc.in_features, fc.out_features) == (768, 100)
    # State-dict keys match the DLG reference code's LeNet.
    assert list(model.state_dict()) == [
        "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
        "body.4.weight", "body.4.bias", "fc.0.weight", "fc.0.bias",
    ]  # fmt: skip


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_lenet_dlg_parameter_count(classes):
    model = build_model("lenet-dlg", num_classes=classes, generator=gen())
    expected = (3 * 12 * 25 + 12) + (12 * 12 * 25 + 12) + (12 * 12 * 25 + 12) + 768 * classes + classes
    assert count_parameters(model) == expected


def test_lenet_dlg_uniform_init():
    model = build_model("lenet-dlg", num_classes=10, generator=gen(3))
    for p in model.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
    w = flat(model).double()
    assert w.numel() == 15826
    assert abs(w.mean().item()) < 0.01
    assert w.var().item() == pytest.approx(1 / 12, abs=0.004)
    # Every tensor (biases too) is uniform, not just the big ones.
    assert model.body[0].bias.abs().max() > 0.2
    hist = torch.histc(w, bins=10, min=-0.5, max=0.5)
    assert (hist / w.numel() - 0.1).abs().max() < 0.02


def test_lenet_dlg_seeded_determinism():
    a = build_model("lenet-dlg", num_classes=10, generator=gen(7))
    b = build_model("lenet-dlg", num_classes=10, generator=gen(7))
    c = build_model("lenet-dlg", num_classes=10, generator=gen(8))
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


@pytest.mark.parametrize("name", ["lenet-dlg", "convnet", "resnet20"])
def test_seeded_build_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    a = build_model(name, num_classes=10, generator=gen(1))
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(name, num_classes=10, generator=gen(1))
    c = build_model(name, num_classes=10, generator=gen(2))
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


@pytest.mark.parametrize("channels", [1, 3])
def test_lenet_dlg_output_shape(channels):
    model = build_model("lenet-dlg", num_classes=10, channels=channels, generator=gen())
    out = model(torch.rand(4, channels, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


def test_lenet_dlg_other_size():
    model = build_model("lenet-dlg", num_classes=10, channels=1, size=28, generator=gen())
    assert model.fc[0].in_features == 12 * 7 * 7
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_lenet_dlg_twice_differentiable():
    """The DLG objective: gradient distance, differentiated w.r.t. the dummy input."""
    torch.manual_seed(0)
    model = build_model("lenet-dlg", num_classes=10, generator=gen())
    params = list(model.parameters())
    x_true = torch.rand(1, 3, 32, 32)
    y = torch.tensor([3])
    target = torch.autograd.grad(nn.functional.cross_entropy(model(x_true), y), params)
    dummy = torch.rand(1, 3, 32, 32, requires_grad=True)
    dummy_grads = torch.autograd.grad(nn.functional.cross_entropy(model(dummy), y), params, create_graph=True)
    distance = sum(((g - t) ** 2).sum() for g, t in zip(dummy_grads, target))
    (dx,) = torch.autograd.grad(distance, dummy)
    assert torch.isfinite(dx).all()
    assert dx.abs().sum() > 0


def test_lenet_dlg_functional_vmap_grad_of_grad():
    model = build_model("lenet-dlg", num_classes=10, generator=gen())
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    def grad_norm(x, p, y):
        g = grad(loss)(p, x, y)
        return sum((v**2).sum() for v in g.values())

    xs = torch.rand(3, 3, 32, 32)
    ys = torch.tensor([0, 1, 2])
    per_sample = vmap(grad(grad_norm), in_dims=(0, None, 0))(xs, params, ys)
    assert per_sample.shape == xs.shape
    assert torch.isfinite(per_sample).all()
    assert (per_sample.flatten(1).abs().sum(1) > 0).all()


# ----------------------------------------------------------------------------- others


def test_convnet_shapes():
    model = build_model("convnet", num_classes=10, channels=3, generator=gen())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    small = build_model("convnet", num_classes=2, channels=1, size=8, generator=gen())
    assert small(torch.rand(5, 1, 8, 8)).shape == (5, 2)


def test_resnet20_structure_and_size():
    model = build_model("resnet20", num_classes=10, generator=gen())
    n = count_parameters(model)
    assert n == 269_722  # the usual "0.27M" of He et al. (option-A shortcuts)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20  # 20 weighted layers
    assert all(c.kernel_size == (3, 3) for c in convs)  # option A: no 1x1 projection shortcuts
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model("resnet20", num_classes=100, channels=1, generator=gen())
    assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 100)


def test_resnet20_trains_a_step():
    model = build_model("resnet20", num_classes=10, generator=gen())
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
