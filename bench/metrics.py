"""Reconstruction metrics, batch matching and the success rule.

Image metrics take numpy float arrays ``original`` and ``reconstruction`` of shape
[C, H, W] (one image, values in [0, 1]) and return a Python float:

* ``mse``  -- mean squared error over all pixels and channels
  (``skimage.metrics.mean_squared_error``);
* ``psnr`` -- ``skimage.metrics.peak_signal_noise_ratio(..., data_range=1)``;
  identical images give ``+inf`` (not capped; callers aggregating PSNR must
  handle inf);
* ``ssim`` -- ``skimage.metrics.structural_similarity(original, reconstruction,
  data_range=1, channel_axis=0)``: skimage defaults, i.e. uniform 7x7 window
  (``gaussian_weights=False``), K1=0.01, K2=0.03, mean over channels.

The reconstruction is clamped to [0, 1] before scoring: the attacker's dummy image
is optimised unconstrained and may leave the data range, while the original lives
in it, so both are scored in the data range (this is what a viewer of the leaked
image would see). NaN pixels (a diverged attack) are mapped to 0.5 (mid-grey, an
uninformative value) before clamping, so scores stay finite and sortable; +-inf
pixels clamp to 1/0. Originals are used as given.

``leakage_direction`` says which direction of a metric means MORE leakage:
``"lower"`` for mse, ``"higher"`` for psnr, ssim and label_acc.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)

from bench.errors import UserError
from bench.registry import Registry

__all__ = [
    "METRICS",
    "Metric",
    "SuccessRule",
    "clamp_reconstruction",
    "label_accuracy",
    "match_reconstructions",
    "mse",
    "parse_success",
    "psnr",
    "score_images",
    "ssim",
]

Direction = Literal["lower", "higher"]


def clamp_reconstruction(reconstruction: np.ndarray) -> np.ndarray:
    """float64 copy with NaN -> 0.5, then clipped to [0, 1] (see module doc)."""
    rec = np.asarray(reconstruction, dtype=np.float64)
    return np.clip(np.nan_to_num(rec, nan=0.5, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _pair(
    original: np.ndarray, reconstruction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    orig = np.asarray(original, dtype=np.float64)
    rec = clamp_reconstruction(reconstruction)
    if orig.shape != rec.shape or orig.ndim != 3:
        raise ValueError(
            f"expected two [C,H,W] images of the same shape, got {orig.shape} and {rec.shape}"
        )
    return orig, rec


def mse(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean squared error over all pixels and channels (reconstruction clamped)."""
    orig, rec = _pair(original, reconstruction)
    return float(mean_squared_error(orig, rec))


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB with data_range=1; +inf for identical images (not capped)."""
    orig, rec = _pair(original, reconstruction)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(orig, rec, data_range=1))


def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """SSIM, skimage defaults (uniform 7x7 window), data_range=1, channel_axis=0."""
    orig, rec = _pair(original, reconstruction)
    return float(structural_similarity(orig, rec, data_range=1, channel_axis=0))


def label_accuracy(
    true_labels: Sequence[int], recovered_labels: Sequence[int]
) -> float:
    """Fraction of positions where the recovered label equals the true label."""
    t = np.asarray(true_labels).reshape(-1)
    r = np.asarray(recovered_labels).reshape(-1)
    if t.shape != r.shape:
        raise ValueError(
            f"label_accuracy: {t.size} true labels vs {r.size} recovered labels"
        )
    if t.size == 0:
        raise ValueError("label_accuracy: no labels")
    return float(np.mean(t == r))


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    ``fn(original, reconstruction) -> float`` for image metrics (``on="images"``);
    for ``label_acc`` (``on="labels"``) ``fn(true_labels, recovered_labels)``.
    """

    name: str
    fn: Callable[..., float]
    leakage_direction: Direction
    description: str
    on: Literal["images", "labels"] = "images"

    def more_leakage(self, value: float, threshold: float) -> bool:
        """True iff ``value`` is strictly on the leaking side of ``threshold`` (NaN -> False)."""
        if self.leakage_direction == "lower":
            return value < threshold
        return value > threshold


METRICS: Registry[Metric] = Registry("metric")
METRICS.register(
    "mse",
    Metric("mse", mse, "lower", "mean squared error, reconstruction clamped to [0,1]"),
)
METRICS.register(
    "psnr", Metric("psnr", psnr, "higher", "PSNR in dB, data_range=1; inf if identical")
)
METRICS.register(
    "ssim",
    Metric(
        "ssim",
        ssim,
        "higher",
        "SSIM, skimage defaults (7x7 uniform window), data_range=1",
    ),
)
METRICS.register(
    "label_acc",
    Metric(
        "label_acc",
        label_accuracy,
        "higher",
        "1 if the matched slot's recovered label is right",
        "labels",
    ),
)


def _batch(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 4:
        raise ValueError(f"{what}: expected [B,C,H,W], got shape {a.shape}")
    return a


def match_reconstructions(
    originals: np.ndarray, reconstructions: np.ndarray
) -> np.ndarray:
    """Permutation ``perm`` pairing original i with reconstruction ``perm[i]``.

    DLG's dummy batch is permutation-symmetric (any order of the dummy images
    produces the same gradient), so reconstruction j need not correspond to
    original j. We pick the pairing of minimum total MSE (on clamped
    reconstructions) with ``scipy.optimize.linear_sum_assignment``. B = 1 is the
    identity.
    """
    orig = _batch(originals, "originals")
    recs = _batch(reconstructions, "reconstructions")
    if orig.shape != recs.shape:
        raise ValueError(
            f"originals {orig.shape} and reconstructions {recs.shape} differ in shape"
        )
    b = orig.shape[0]
    if b <= 1:
        return np.arange(b)
    recs = clamp_reconstruction(recs)
    o = orig.reshape(b, -1)
    r = recs.reshape(b, -1)
    cost = ((o[:, None, :] - r[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(b, dtype=np.int64)
    perm[rows] = cols
    return perm


def score_images(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    true_labels: Sequence[int],
    rec_labels: Sequence[int] | None,
) -> list[dict[str, float]]:
    """One dict per original image with every registered metric (``mse``, ``psnr``, ``ssim``, ``label_acc``, ...).

    Originals are first matched to reconstructions (:func:`match_reconstructions`).
    ``label_acc`` for original i is 1.0 if the label recovered for its matched
    slot equals its true label, else 0.0 (NaN if ``rec_labels`` is None, i.e. the
    attack recovers no labels).
    """
    orig = _batch(originals, "originals")
    recs = _batch(reconstructions, "reconstructions")
    perm = match_reconstructions(orig, recs)
    true = np.asarray(true_labels).reshape(-1)
    if true.size != orig.shape[0]:
        raise ValueError(f"{true.size} true labels for a batch of {orig.shape[0]}")
    rec_lab = None if rec_labels is None else np.asarray(rec_labels).reshape(-1)
    if rec_lab is not None and rec_lab.size != orig.shape[0]:
        raise ValueError(
            f"{rec_lab.size} recovered labels for a batch of {orig.shape[0]}"
        )
    rows = []
    for i, j in enumerate(perm):
        row = {}
        for name in METRICS.names():
            m = METRICS.get(name)
            if m.on == "images":
                row[name] = m.fn(orig[i], recs[j])
            else:  # label metrics score original i's label against its matched slot's
                row[name] = math.nan if rec_lab is None else m.fn(true[i : i + 1], rec_lab[j : j + 1])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class SuccessRule:
    """An attack on one image succeeds if ``metric`` is strictly past ``threshold``
    in the metric's leakage direction (mse < threshold; psnr/ssim/label_acc > threshold).
    A NaN value never succeeds."""

    metric: str
    threshold: float

    def success(self, row: Mapping[str, float]) -> bool:
        if self.metric not in row:
            raise KeyError(
                f"success rule needs {self.metric!r} in the score row; got {sorted(row)}"
            )
        return METRICS.get(self.metric).more_leakage(
            float(row[self.metric]), self.threshold
        )

    def __str__(self) -> str:
        op = "<" if METRICS.get(self.metric).leakage_direction == "lower" else ">"
        return f"{self.metric} {op} {self.threshold:g}"


def parse_success(spec: object, key: str = "success") -> SuccessRule:
    """``{"metric": "ssim", "threshold": 0.6}`` -> SuccessRule; one-line UserError if bad."""
    example = "e.g. {metric: ssim, threshold: 0.6}"
    if not isinstance(spec, Mapping):
        raise UserError(
            f"{key}: expected a mapping with metric and threshold ({example}), got {spec!r}"
        )
    unknown = sorted(set(map(str, spec)) - {"metric", "threshold"})
    if unknown:
        raise UserError(
            f"{key}: unknown key(s) {', '.join(unknown)}; allowed: metric, threshold"
        )
    if "metric" not in spec:
        raise UserError(
            f"{key}.metric: missing; one of {', '.join(METRICS.names())} ({example})"
        )
    name = spec["metric"]
    if not isinstance(name, str):
        raise UserError(
            f"{key}.metric: expected a metric name, got {name!r}; allowed: {', '.join(METRICS.names())}"
        )
    METRICS.get(name, key=f"{key}.metric")
    if "threshold" not in spec:
        raise UserError(f"{key}.threshold: missing; give a number ({example})")
    raw = spec["threshold"]
    try:
        if isinstance(raw, bool):
            raise TypeError
        threshold = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{key}.threshold: expected a number, got {raw!r}") from None
    if math.isnan(threshold):
        raise UserError(f"{key}.threshold: expected a number, got nan")
    return SuccessRule(metric=name, threshold=threshold)
