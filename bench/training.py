"""Accuracy cost of a defense: train a model on defended gradients, report test accuracy.

Setting (the DLG paper's): synchronous data-parallel SGD with ``K = config.workers``
workers. Every step

1. takes the next minibatch of ``config.batch_size`` examples (a fresh random order
   each epoch) and splits it into ``K`` contiguous shards whose sizes differ by at
   most one;
2. each worker computes the gradient of the *mean* cross-entropy of its shard w.r.t.
   all trainable parameters (one forward/backward per shard, model in train mode, so
   BatchNorm normalises with shard statistics and its running statistics are updated
   once per shard, as in unsynchronised data parallelism);
3. each worker applies the defense to its list of gradient tensors
   (``defense(grads, generator=g) -> list[Tensor]``, same length and shapes, in
   ``model.parameters()`` order) -- this is the gradient an attacker would see;
4. the server averages the K defended gradients (equal weight per worker), assigns
   the average to ``p.grad`` and takes an SGD step with momentum; weight decay is
   added by the optimiser, i.e. after the defense (it is local, never shared).

A final batch with fewer than ``K`` examples is dropped (every worker needs data);
otherwise the last, smaller batch of an epoch is used.

Inputs are normalised per channel with the mean and standard deviation of the
*training* images (over all training pixels), applied to train and test alike.
Optional augmentation (``augment=True``): random crop with 4-pixel zero padding
(in [0, 1] pixel space, before normalisation) and random horizontal flip.

Learning rate: cosine annealing over all steps, no warm-up:
``lr_t = lr * (1 + cos(pi * t / T)) / 2`` for step ``t = 0 .. T-1``.

Randomness: everything is drawn from ``torch.Generator`` objects derived from
``config.seed`` (data order and augmentation, model init, defense); the global RNG
is never used, so the same config and data give identical results on the CPU. (On
CUDA, cuDNN kernels may be non-deterministic unless the caller enables
``torch.use_deterministic_algorithms``.) Thread settings are left to the caller.

Divergence: if a shard loss or the averaged defended gradient is NaN/inf, that step
is still applied (as the real SGD would), training stops, ``diverged`` is True and
the model is evaluated as is (rows with non-finite logits predict class 0, so a
broken model scores at about chance level). Nothing is raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import UserError
from bench.models import MODELS, build_model

__all__ = [
    "Defense",
    "TrainConfig",
    "channel_stats",
    "derive_seeds",
    "evaluate",
    "identity_defense",
    "train_and_evaluate",
]

Defense = Callable[..., list[Tensor]]
"""``defense(grads: list[Tensor], *, generator: torch.Generator) -> list[Tensor]``."""

EVAL_BATCH = 500


def identity_defense(grads: Sequence[Tensor], *, generator: torch.Generator | None = None) -> list[Tensor]:
    """No defense: the gradients are shared as computed."""
    return list(grads)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    epochs: int
    batch_size: int
    workers: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    augment: bool = False

    def __post_init__(self) -> None:
        MODELS.get(self.model, key="model")
        for key in ("epochs", "batch_size", "workers", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{key} must be an integer, got {value!r}")
        if self.epochs < 0:
            raise UserError(f"epochs must be >= 0, got {self.epochs}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")
        if self.batch_size < self.workers:
            raise UserError(
                f"batch_size ({self.batch_size}) must be >= workers ({self.workers}): every worker needs a shard"
            )
        for key in ("lr", "momentum", "weight_decay"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.momentum >= 1:
            raise UserError(f"momentum must be < 1, got {self.momentum}")


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent 62-bit seeds for the data order, model init and defense, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    data, model, defense = torch.randint(0, 2**62, (3,), generator=g).tolist()
    return {"data": data, "model": model, "defense": defense}


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over all images and pixels, shaped ``[1, C, 1, 1]``.

    A constant channel gets std 1 (no scaling) instead of a division by zero.
    """
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def _as_float_images(images: Tensor, name: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise UserError(f"{name} must be a tensor [n, C, H, W], got {getattr(images, 'shape', type(images))}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise UserError(f"{name} must be float in [0, 1] (or uint8), got {images.dtype}")
    return images.float()


def _check_labels(labels: Tensor, n: int, num_classes: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise UserError(f"{name} must be a 1-D tensor of {n} labels, got {getattr(labels, 'shape', type(labels))}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"{name} must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with ``pad`` zero padding and random horizontal flip, per image."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # [b, h]
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # [b, w]
    idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded[idx, :, rows[:, :, None], cols[:, None, :]]  # [b, h, w, C]
    out = out.permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


@torch.no_grad()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, *, batch_size: int = EVAL_BATCH
) -> float:
    """Top-1 accuracy in batches, model in eval mode. Non-finite logits count as class 0."""
    n = images.shape[0]
    if n == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = mean.device
    correct = 0
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        logits = model((x - mean) / std).float()
        logits = torch.nan_to_num(logits, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        pred = logits.argmax(dim=1)
        correct += int((pred == y).sum())
    model.train(was_training)
    return correct / n


def _shards(batch: int, workers: int) -> list[tuple[int, int]]:
    bounds = [batch * k // workers for k in range(workers + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(workers)]


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def train_and_evaluate(
    config: TrainConfig,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    defense: Defense,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Train ``config.model`` with data-parallel SGD on defended gradients; see the module docstring.

    Returns ``{"test_accuracy", "train_loss", "epochs", "steps", "seconds", "diverged"}``:
    ``train_loss`` is the mean shard loss over the last epoch run (finite steps only;
    NaN if there were none), ``epochs`` the number of epochs run (the last may be
    partial if training diverged), ``steps`` the optimiser steps taken, ``seconds``
    the wall time of training plus evaluation.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if not isinstance(config, TrainConfig):
        raise UserError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not callable(defense):
        raise UserError("defense must be callable: defense(grads, *, generator) -> list of tensors")
    train_x = _as_float_images(train_images, "train_images")
    test_x = _as_float_images(test_images, "test_images")
    n, channels, height, width = train_x.shape
    if n == 0:
        raise UserError("train_images is empty")
    if height != width:
        raise UserError(f"images must be square, got {height}x{width}")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"test_images shape {tuple(test_x.shape[1:])} != train_images shape {tuple(train_x.shape[1:])}")
    train_y = _check_labels(train_labels, n, num_classes, "train_labels")
    test_y = _check_labels(test_labels, test_x.shape[0], num_classes, "test_labels")

    seeds = derive_seeds(config.seed)
    data_gen = torch.Generator().manual_seed(seeds["data"])
    model_gen = torch.Generator().manual_seed(seeds["model"])
    defense_gen = torch.Generator(device=device).manual_seed(seeds["defense"])

    model = build_model(config.model, num_classes=num_classes, channels=channels, size=height, generator=model_gen)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    mean, std = channel_stats(train_x)
    mean, std = mean.to(device), std.to(device)
    train_x = train_x.to(device)
    train_y = train_y.to(device)

    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    k = config.workers
    batch_starts = [s for s in range(0, n, config.batch_size) if min(config.batch_size, n - s) >= k]
    total_steps = config.epochs * len(batch_starts)

    steps = 0
    epochs_run = 0
    diverged = False
    last_epoch_losses: list[float] = []
    for _epoch in range(config.epochs):
        epochs_run += 1
        epoch_losses: list[Tensor] = []
        order = torch.randperm(n, generator=data_gen).to(device)
        for start in batch_starts:
            idx = order[start : start + config.batch_size]
            x = train_x[idx]
            if config.augment:
                x = _augment(x, data_gen)
            x = (x - mean) / std
            y = train_y[idx]

            summed = [torch.zeros_like(p) for p in params]
            step_losses = []
            for lo, hi in _shards(idx.shape[0], k):
                loss = F.cross_entropy(model(x[lo:hi]), y[lo:hi])
                grads = torch.autograd.grad(loss, params)
                step_losses.append(loss.detach())
                shared = defense([g.detach() for g in grads], generator=defense_gen)
                shared = list(shared)
                if len(shared) != len(params) or any(s.shape != p.shape for s, p in zip(shared, params)):
                    raise ValueError(
                        "defense must return one tensor per parameter with the same shapes "
                        f"(got {len(shared)} tensors for {len(params)} parameters)"
                    )
                for acc, s in zip(summed, shared):
                    acc.add_(s.to(device=acc.device, dtype=acc.dtype))
            for p, acc in zip(params, summed):
                p.grad = acc.div_(k)
            optimizer.param_groups[0]["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * steps / max(total_steps, 1)))
            optimizer.step()
            steps += 1

            losses = torch.stack(step_losses)
            finite = torch.isfinite(losses)
            epoch_losses.append(losses[finite])
            if not (bool(finite.all()) and _all_finite(summed)):
                diverged = True
            if progress is not None:
                progress(steps / max(total_steps, 1))
            if diverged:
                break
        last_epoch_losses = torch.cat(epoch_losses).tolist() if epoch_losses else []
        if diverged:
            break

    for p in params:
        p.grad = None
    test_accuracy = evaluate(model, test_x, test_y, mean, std)
    train_loss = sum(last_epoch_losses) / len(last_epoch_losses) if last_epoch_losses else float("nan")
    if progress is not None:
        progress(1.0)
    return {
        "test_accuracy": float(test_accuracy),
        "train_loss": float(train_loss),
        "epochs": epochs_run,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "diverged": diverged,
    }
