"""Gradient pruning / compression (DLG paper, Sec. 5: "gradient compression").

``prune`` with sparsity p (percent, 0 <= p < 100) zeroes, in EACH tensor
separately, the k = floor(p / 100 * numel) entries of smallest magnitude |g|;
the other entries are kept unchanged. k is computed exactly (p is read as the
decimal it prints as, so p = 29 on 100 entries prunes 29, not 28).

Ties in |g| are broken deterministically, as a stable sort on |g| over the
flattened tensor would: among equal magnitudes the lower flat index is pruned first.
Entries that are already zero count towards k (they have the smallest magnitude).
Selection is O(numel) (the k-th smallest magnitude, then the ties), not a sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from torch import Tensor

from defenses import DEFENSES, DefenseKind, format_strength

SPARSITY_GRID: tuple[float, ...] = (1, 5, 10, 20, 30, 50, 70, 90, 99)


def pruned_count(sparsity: float, numel: int) -> int:
    """k = floor(sparsity / 100 * numel), computed exactly."""
    return math.floor(Fraction(repr(float(sparsity))) * numel / 100)


def prune_tensor(g: Tensor, sparsity: float) -> Tensor:
    """Zero the floor(sparsity% * numel) smallest-|g| entries of one tensor."""
    k = pruned_count(sparsity, g.numel())
    if k == 0:
        return g.clone()
    # Flat indices are in logical (row-major) order, so this works for any strides.
    mag = g.detach().abs().reshape(-1)
    kth = mag.kthvalue(k).values
    below = mag < kth
    tie = mag == kth
    # Of the entries equal to the k-th magnitude, prune the first (by flat index) that fill k.
    room = k - below.sum()
    mask = below | (tie & (tie.cumsum(0) <= room))
    return g.masked_fill(mask.view(g.shape), 0)


def _prune(
    grads: Sequence[Tensor], sparsity: float | None, generator: object
) -> list[Tensor]:
    assert sparsity is not None
    return [prune_tensor(g, sparsity) for g in grads]


def _check_sparsity(value: float) -> str | None:
    return None if 0 <= value < 100 else "sparsity must be in [0, 100) percent"


DEFENSES.register(
    "prune",
    DefenseKind(
        name="prune",
        family="sparsity",
        parameter="sparsity",
        default_grid=SPARSITY_GRID,
        apply=_prune,
        check=_check_sparsity,
        label_fn=lambda v: f"prune {format_strength(v)}%",
        description="zero the given percent of smallest-magnitude entries of each tensor",
    ),
)
