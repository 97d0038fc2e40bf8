"""Tests for bench/metrics.py: values vs skimage, matching, success rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)
from skimage.transform import resize

from bench.errors import UserError
from bench.metrics import (
    METRICS,
    Metric,
    SuccessRule,
    clamp_reconstruction,
    label_accuracy,
    match_reconstructions,
    mse,
    parse_success,
    psnr,
    score_images,
    ssim,
)


def chw(img: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 HWC image -> float64 [C,H,W] in [0,1], downsampled to size x size."""
    small = resize(img, (size, size), anti_aliasing=True)  # float in [0,1]
    return np.clip(np.moveaxis(small, -1, 0), 0, 1)


ASTRONAUT = chw(skimage.data.astronaut())
CHELSEA = chw(skimage.data.chelsea())
RNG = np.random.default_rng(0)
RANDOM = RNG.random((3, 32, 32))

PAIRS = {
    "astronaut-vs-noisy": (
        ASTRONAUT,
        np.clip(ASTRONAUT + 0.1 * RNG.standard_normal(ASTRONAUT.shape), 0, 1),
    ),
    "astronaut-vs-chelsea": (ASTRONAUT, CHELSEA),
    "random-vs-random": (RANDOM, RNG.random((3, 32, 32))),
    "gray-1ch": (ASTRONAUT[:1], np.clip(ASTRONAUT[:1] * 0.8 + 0.05, 0, 1)),
    "float32": (ASTRONAUT.astype(np.float32), CHELSEA.astype(np.float32)),
}


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_against_skimage(pair):
    a, b = pair
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert mse(a, b) == pytest.approx(mean_squared_error(a64, b64), rel=1e-12)
    assert mse(a, b) == pytest.approx(np.mean((a64 - b64) ** 2), rel=1e-12)
    assert psnr(a, b) == pytest.approx(
        peak_signal_noise_ratio(a64, b64, data_range=1), rel=1e-12
    )
    assert ssim(a, b) == pytest.approx(
        structural_similarity(a64, b64, data_range=1, channel_axis=0), rel=1e-12
    )
    # per-channel mean, uniform 7x7 window (skimage defaults)
    per_channel = np.mean(
        [
            structural_similarity(a64[c], b64[c], data_range=1, win_size=7)
            for c in range(a.shape[0])
        ]
    )
    assert ssim(a, b) == pytest.approx(per_channel, rel=1e-12)
    for name in ("mse", "psnr", "ssim"):
        assert isinstance(METRICS.get(name).fn(a, b), float)


@pytest.mark.parametrize(
    "img", [ASTRONAUT, RANDOM, CHELSEA[:1]], ids=["astronaut", "random", "gray"]
)
def test_identical_images(img):
    assert mse(img, img) == 0.0
    assert ssim(img, img) == pytest.approx(1.0)
    assert psnr(img, img) == math.inf


def test_known_values():
    x = RANDOM
    # x vs 1-x: mse = mean((2x-1)^2)
    assert mse(x, 1 - x) == pytest.approx(np.mean((2 * x - 1) ** 2))
    assert ssim(x, 1 - x) < 0  # anti-correlated
    zeros, ones = np.zeros((3, 16, 16)), np.ones((3, 16, 16))
    assert mse(zeros, ones) == 1.0
    assert psnr(zeros, ones) == pytest.approx(0.0)
    half = np.full((3, 16, 16), 0.5)
    assert mse(zeros, half) == pytest.approx(0.25)
    assert psnr(zeros, half) == pytest.approx(10 * math.log10(4))
    # constant offset c: psnr = -10 log10(c^2)
    assert psnr(half, half + 0.1) == pytest.approx(20.0)


def test_reconstruction_is_clamped():
    x = RANDOM
    wild = x * 5 - 2  # far outside [0,1]
    clamped = np.clip(wild, 0, 1)
    for f in (mse, psnr, ssim):
        assert f(x, wild) == pytest.approx(f(x, clamped), rel=1e-12)
    # an out-of-range reconstruction that clamps to the original scores as identical
    over = np.where(x > 0.5, x, -3.0)
    orig = np.where(x > 0.5, x, 0.0)
    assert mse(orig, over) == 0.0 and psnr(orig, over) == math.inf
    # NaN/inf pixels: NaN -> 0.5, +inf -> 1, -inf -> 0
    bad = np.array([np.nan, np.inf, -np.inf, 2.0, -1.0, 0.25])
    assert np.array_equal(clamp_reconstruction(bad), [0.5, 1.0, 0.0, 1.0, 0.0, 0.25])
    nan_rec = np.full_like(x, np.nan)
    assert mse(x, nan_rec) == pytest.approx(np.mean((x - 0.5) ** 2))


def test_input_not_mutated_and_shape_checked():
    rec = RANDOM * 3 - 1
    keep = rec.copy()
    mse(RANDOM, rec)
    assert np.array_equal(rec, keep)
    with pytest.raises(ValueError):
        mse(RANDOM, RANDOM[:, :16])
    with pytest.raises(ValueError):
        ssim(RANDOM[0], RANDOM[0])  # not [C,H,W]


def test_registry_and_directions():
    assert set(METRICS.names()) == {"mse", "psnr", "ssim", "label_acc"}
    assert METRICS.get("mse").leakage_direction == "lower"
    for name in ("psnr", "ssim", "label_acc"):
        assert METRICS.get(name).leakage_direction == "higher"
    for name in METRICS.names():
        m = METRICS.get(name)
        assert isinstance(m, Metric) and m.name == name and m.description
    with pytest.raises(UserError, match="allowed: label_acc, mse, psnr, ssim"):
        METRICS.get("lpips")


def test_label_accuracy():
    assert label_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert label_accuracy(np.array([7]), [7]) == 1.0
    with pytest.raises(ValueError):
        label_accuracy([1, 2], [1])


# --- matching ------------------------------------------------------------------------


def _batch(b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 3, 16, 16))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), noise=st.floats(0, 0.05))
def test_matching_recovers_shuffle(b, seed, noise):
    rng = np.random.default_rng(seed)
    originals = _batch(b, seed)
    shuffle = rng.permutation(b)  # reconstruction slot j holds original shuffle[j]
    recs = originals[shuffle] + noise * rng.standard_normal(originals.shape)
    perm = match_reconstructions(originals, recs)
    assert sorted(perm.tolist()) == list(range(b))
    # original i was put in slot j with shuffle[j] == i
    assert np.array_equal(shuffle[perm], np.arange(b))


def test_matching_identity_for_single_image_and_minimises_total():
    x = _batch(1, 0)
    assert match_reconstructions(x, 1 - x).tolist() == [0]
    # scalar images: costs [[0.16, 1.0], [0.01, 0.25]]; taking the cheapest pair first
    # (o1->r0, 0.01) forces o0->r1 (total 1.01); the optimum is the identity (0.41)
    o = np.stack([np.full((1, 4, 4), 0.0), np.full((1, 4, 4), 0.5)])
    r = np.stack([np.full((1, 4, 4), 0.4), np.full((1, 4, 4), 1.0)])
    assert match_reconstructions(o, r).tolist() == [0, 1]
    assert match_reconstructions(o, r[::-1]).tolist() == [1, 0]


def test_score_images_uses_matching():
    originals = _batch(4, 3)
    shuffle = np.array([2, 0, 3, 1])
    recs = originals[shuffle].copy()
    # imperfect
    recs[1] = recs[1] + 0.1 * np.random.default_rng(1).standard_normal(recs[1].shape)
    true = [5, 6, 7, 8]
    rec_labels = [7, 5, 8, 0]  # slot 3 (original 1) label wrong
    rows = score_images(originals, recs, true, rec_labels)
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"mse", "psnr", "ssim", "label_acc"}
        assert all(isinstance(v, float) for v in row.values())
    perm = match_reconstructions(originals, recs)
    assert perm.tolist() == [1, 3, 0, 2]
    for i, row in enumerate(rows):
        j = perm[i]
        assert row["mse"] == pytest.approx(mse(originals[i], recs[j]))
        assert row["ssim"] == pytest.approx(ssim(originals[i], recs[j]))
    for i in (2, 3):  # exact reconstructions
        assert (
            rows[i]["mse"] == 0
            and rows[i]["psnr"] == math.inf
            and rows[i]["ssim"] == pytest.approx(1)
        )
    assert rows[2]["label_acc"] == 1.0 and rows[3]["label_acc"] == 1.0
    assert rows[0]["label_acc"] == 1.0 and rows[1]["label_acc"] == 0.0
    assert rows[0]["mse"] > 0
    no_labels = score_images(originals, recs, true, None)
    assert all(math.isnan(r["label_acc"]) for r in no_labels)


def test_score_single_image():
    x = ASTRONAUT[None]
    rows = score_images(x, x, [3], [3])
    assert rows == [
        {"mse": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0), "label_acc": 1.0}
    ]


# --- success rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric,threshold,value,expected",
    [
        ("mse", 0.01, 0.001, True),
        ("mse", 0.01, 0.5, False),
        ("mse", 0.01, 0.01, False),  # strict
        ("ssim", 0.6, 0.9, True),
        ("ssim", 0.6, 0.1, False),
        ("psnr", 20, math.inf, True),
        ("psnr", 20, 15, False),
        ("label_acc", 0.5, 1.0, True),
        ("ssim", 0.6, math.nan, False),
        ("mse", 0.01, math.nan, False),
    ],
)
def test_success_direction(metric, threshold, value, expected):
    rule = parse_success({"metric": metric, "threshold": threshold})
    assert rule == SuccessRule(metric, float(threshold))
    assert rule.success({metric: value, "other": 0.0}) is expected


def test_success_str():
    assert str(SuccessRule("mse", 0.01)) == "mse < 0.01"
    assert str(SuccessRule("ssim", 0.6)) == "ssim > 0.6"


@pytest.mark.parametrize(
    "spec,needle",
    [
        (
            {"metric": "lpips", "threshold": 0.1},
            "success.metric: unknown metric 'lpips'; allowed: label_acc, mse, psnr, ssim",
        ),
        ({"metric": "ssim"}, "success.threshold: missing"),
        ({"threshold": 0.1}, "success.metric: missing"),
        (
            {"metric": "ssim", "threshold": "high"},
            "success.threshold: expected a number",
        ),
        ({"metric": "ssim", "threshold": None}, "success.threshold: expected a number"),
        ({"metric": "ssim", "threshold": 0.5, "op": ">"}, "success: unknown key(s) op"),
        ("ssim>0.5", "success: expected a mapping"),
        ({"metric": 3, "threshold": 0.5}, "success.metric: expected a metric name"),
    ],
)
def test_bad_success_rule(spec, needle):
    with pytest.raises(UserError) as exc:
        parse_success(spec)
    msg = str(exc.value)
    assert "\n" not in msg and needle in msg


def test_success_custom_key():
    with pytest.raises(UserError, match=r"^attack\.success\.metric: unknown"):
        parse_success({"metric": "x", "threshold": 1}, key="attack.success")


def test_score_images_scores_every_registered_metric(monkeypatch):
    """A newly registered image metric appears in the score rows with no change elsewhere."""
    from bench.metrics import METRICS, Metric

    monkeypatch.setitem(METRICS._entries, "mean_abs", Metric("mean_abs", lambda o, r: float(np.abs(o - r).mean()),
                                                            "lower", "mean absolute error"))
    orig = np.zeros((1, 3, 8, 8))
    rows = score_images(orig, orig + 0.25, [3], [3])
    assert rows[0]["mean_abs"] == pytest.approx(0.25)
    assert rows[0]["label_acc"] == 1.0 and rows[0]["mse"] == pytest.approx(0.0625)
