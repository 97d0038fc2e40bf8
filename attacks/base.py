"""The attack contract: a batch of independent attack problems ("lanes") in, one result per lane out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bench.registry import Registry


@dataclass
class Lane:
    """One attack problem: what the attacker sees (weights and the shared, defended gradient)."""

    params: dict[str, Tensor]  # the victim model's weights, by parameter name
    target_grads: dict[str, Tensor]  # the shared gradient, by parameter name
    seed: int  # seeds the dummy image and label


@dataclass
class AttackBatch:
    """Lanes that share one architecture, image shape, class count and victim batch size."""

    model: nn.Module  # architecture; each lane brings its own weights
    image_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    batch_size: int  # victim batch size B
    lanes: list[Lane]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # At most this many lanes are computed together (None: all); the rest queue and take the
    # place of lanes that stop. Changes speed and memory, never a lane's result.
    slots: int | None = None


@dataclass
class AttackResult:
    reconstructions: Tensor  # [N, B, C, H, W], as optimised (not clamped)
    labels: Tensor  # [N, B] recovered labels
    loss_trace: Tensor  # [N, steps] gradient-match loss returned by each optimizer step
    closures: Tensor  # [N] closure evaluations per lane
    status: list[str]  # per lane: converged | budget | diverged
    seconds: float  # wall time of the whole batch (compilation included)
    final_loss: Tensor  # [N]
    rounds: int  # batched closure calls (lane after lane: each C call's most rounds of one lane; serial: closures)
    snapshots: dict[int, Tensor] = field(default_factory=dict)  # step -> [N, B, C, H, W]


class Attack(Protocol):
    """``progress(k)``, if given, is called as the attack advances: k more optimizer steps done,
    averaged over the batch's lanes."""

    name: str

    def __call__(self, batch: AttackBatch, *, progress: Callable[[float], None] | None = None,
                 snapshot_steps: tuple[int, ...] = ()) -> AttackResult: ...


@dataclass(frozen=True)
class AttackKind:
    """A registered attack family: ``make(**settings)`` validates settings and returns an Attack."""

    name: str
    description: str
    make: Callable[..., Attack]
    defaults: dict[str, Any]


ATTACKS: Registry[AttackKind] = Registry("attack")
