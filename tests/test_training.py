import math

import pytest
import torch
import torch.nn.functional as F

from bench import training
from bench.errors import UserError
from bench.models import build_model
from bench.training import (
    TrainConfig,
    channel_stats,
    derive_seeds,
    identity_defense,
    train_and_evaluate,
)


def separable(n: int, seed: int, channels: int = 1, size: int = 8):
    """Two classes: bright top half vs bright bottom half, plus noise; images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, channels, size, size, generator=g)
    half = size // 2
    x[y == 0, :, :half] += 0.6
    x[y == 1, :, half:] += 0.6
    return x.clamp(0, 1), y


TRAIN = separable(200, 0)
TEST = separable(100, 1)


def config(**kw) -> TrainConfig:
    base = {"model": "convnet", "epochs": 2, "batch_size": 20, "workers": 4, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 0.0, "seed": 0}
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig, defense=identity_defense, **kw):
    return train_and_evaluate(cfg, *TRAIN, *TEST, 2, defense, **kw)


def zero_defense(grads, *, generator):
    return [torch.zeros_like(g) for g in grads]


class Capture:
    """Wraps build_model to keep the trained model and a copy of its initial weights."""

    def __init__(self, monkeypatch):
        self.model = None
        self.initial = None
        monkeypatch.setattr(training, "build_model", self)

    def __call__(self, *args, **kwargs):
        self.model = build_model(*args, **kwargs)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        return self.model


def test_undefended_training_learns():
    result = run(config())
    assert set(result) == {"test_accuracy", "train_loss", "epochs", "steps", "seconds", "diverged"}
    assert result["test_accuracy"] > 0.9
    assert result["diverged"] is False
    assert result["epochs"] == 2
    assert result["steps"] == 2 * 10
    assert result["train_loss"] < math.log(2)
    assert result["seconds"] > 0


def test_zero_defense_learns_nothing(monkeypatch):
    cap = Capture(monkeypatch)
    result = run(config(), zero_defense)
    untrained = run(config(epochs=0))
    assert result["test_accuracy"] == untrained["test_accuracy"]
    assert result["test_accuracy"] == pytest.approx(0.5, abs=0.15)  # chance (for this seed's init)
    for k, v in cap.model.state_dict().items():
        assert torch.equal(v, cap.initial[k]), k
    assert result["steps"] == 20 and not result["diverged"]
    assert result["train_loss"] == pytest.approx(math.log(2), abs=0.2)


def test_zero_defense_with_weight_decay_only_shrinks(monkeypatch):
    cap = Capture(monkeypatch)
    run(config(weight_decay=0.1, epochs=1), zero_defense)
    for name, p in cap.model.named_parameters():
        before = cap.initial[name]
        assert p.detach().norm() < before.norm(), name
        # Pure decay never changes a weight's sign.
        assert (p.detach() * before >= 0).all(), name


def test_defense_called_k_times_per_step_with_shard_gradients():
    calls = []

    def recording(grads, *, generator):
        assert isinstance(generator, torch.Generator)
        calls.append([g.clone() for g in grads])
        return list(grads)

    cfg = config(epochs=1, batch_size=30, workers=3)
    result = run(cfg, recording)
    # 200 examples / 30 per batch: 6 full batches and a last one of 20 (>= 3 workers).
    assert result["steps"] == 7
    assert len(calls) == 3 * 7

    # Recompute the first step's shard gradients from the documented recipe.
    seeds = derive_seeds(cfg.seed)
    model = build_model("convnet", num_classes=2, channels=1, size=8,
                        generator=torch.Generator().manual_seed(seeds["model"]))
    params = list(model.parameters())
    order = torch.randperm(200, generator=torch.Generator().manual_seed(seeds["data"]))
    x, y = TRAIN[0][order[:30]], TRAIN[1][order[:30]]
    mean, std = channel_stats(TRAIN[0])
    x = (x - mean) / std
    for k in range(3):
        sl = slice(10 * k, 10 * (k + 1))
        expected = torch.autograd.grad(F.cross_entropy(model(x[sl]), y[sl]), params)
        got = calls[k]
        assert len(got) == len(params)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # Different shards give different gradients.
    assert not torch.equal(calls[0][0], calls[1][0])


def test_small_last_batch_dropped():
    calls = []

    def recording(grads, *, generator):
        calls.append(1)
        return grads

    # 200 = 3 * 66 + 2: the last batch has 2 < 4 workers and is dropped.
    result = run(config(epochs=1, batch_size=66, workers=4), recording)
    assert result["steps"] == 3
    assert len(calls) == 12


def test_deterministic_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def noisy(grads, *, generator):
        return [g + 0.01 * torch.randn(g.shape, generator=generator) for g in grads]

    a = run(config(epochs=1, augment=True), noisy)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state must not matter
    b = run(config(epochs=1, augment=True), noisy)
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["train_loss"] == b["train_loss"]
    c = run(config(epochs=1, augment=True, seed=1), noisy)
    assert c["train_loss"] != a["train_loss"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_defense_diverges_without_exception(bad):
    progress = []

    def broken(grads, *, generator):
        return [torch.full_like(g, bad) for g in grads]

    result = run(config(), broken, progress=progress.append)
    assert result["diverged"] is True
    assert result["steps"] == 1
    assert result["epochs"] == 1
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["test_accuracy"] == pytest.approx(0.5, abs=0.15)
    assert progress[-1] == 1.0


def test_exploding_lr_diverges():
    result = run(config(lr=1e6, momentum=0.0))
    assert result["diverged"] is True
    assert result["steps"] < 20


def test_progress_reports_fractions():
    seen = []
    run(config(epochs=1), progress=seen.append)
    assert seen[0] == pytest.approx(0.1)
    assert seen[-1] == 1.0
    assert seen == sorted(seen)


def test_uint8_images_and_zero_epochs():
    x, y = TRAIN
    x8 = (x * 255).round().to(torch.uint8)
    result = train_and_evaluate(config(epochs=0), x8, y, *TEST, 2, identity_defense)
    assert result["steps"] == 0 and result["epochs"] == 0
    assert math.isnan(result["train_loss"])
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_lenet_and_resnet_run():
    x, y = separable(40, 2, channels=3, size=32)
    for model in ("lenet-dlg", "resnet20"):
        result = train_and_evaluate(
            config(model=model, epochs=1, batch_size=20, workers=2, lr=0.01), x, y, x[:10], y[:10], 2, identity_defense
        )
        assert result["steps"] == 2 and not result["diverged"]


def test_channel_stats():
    x = torch.rand(50, 3, 4, 4)
    x[:, 2] = 0.5
    mean, std = channel_stats(x)
    assert mean.shape == std.shape == (1, 3, 1, 1)
    torch.testing.assert_close(mean.flatten()[:2], x[:, :2].mean(dim=(0, 2, 3)))
    assert std.flatten()[2] == 1.0  # constant channel: no scaling


def test_augment_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = training._augment(x, g)
    assert out.shape == x.shape
    same = training._augment(x, torch.Generator().manual_seed(0), pad=0)
    # pad=0: each image is either itself or its mirror image.
    for a, b in zip(same, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))


@pytest.mark.parametrize(
    "kw",
    [
        {"model": "vgg"},
        {"batch_size": 3, "workers": 4},
        {"workers": 0},
        {"epochs": -1},
        {"lr": float("nan")},
        {"momentum": 1.0},
    ],
)
def test_bad_config_is_user_error(kw):
    with pytest.raises(UserError):
        config(**kw)


def test_bad_labels_are_user_error():
    x, y = TRAIN
    with pytest.raises(UserError, match="train_labels"):
        train_and_evaluate(config(), x, y + 5, *TEST, 2, identity_defense)


def test_defense_returning_wrong_shapes_raises():
    with pytest.raises(ValueError, match="one tensor per parameter"):
        run(config(), lambda grads, *, generator: grads[:-1])
