"""Gradient defenses: pure functions on the list of gradient tensors.

Contract (every registered defense)::

    defense(grads: list[Tensor], *, generator: torch.Generator | None) -> list[Tensor]

* pure: the input tensors are never modified; the output is a new list of new
  tensors (even ``none`` returns clones, so callers may mutate the result);
* shape-, dtype- and device-preserving, tensor by tensor;
* randomised defenses draw all randomness from ``generator`` (required for them,
  ignored by deterministic ones), so the same seed gives the same output.

The same defended gradients are what the attacker observes and what the optimizer
steps on in accuracy-cost training.

Each family lives in one small module (``noise``, ``precision``, ``sparsity``)
that registers :class:`DefenseKind` objects in :data:`DEFENSES`; the modules are
imported explicitly at the bottom of this file. Adding a defense = one small file
plus one import line here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.errors import UserError
from bench.registry import Registry

__all__ = [
    "DEFENSES",
    "ApplyFn",
    "CheckFn",
    "Defense",
    "DefenseKind",
    "format_strength",
    "make_defense",
]

#: ``apply(grads, strength, generator) -> new grads`` (the family's implementation).
ApplyFn = Callable[
    [Sequence[Tensor], "float | None", "torch.Generator | None"], list[Tensor]
]
#: ``check(strength) -> None`` or the reason it is invalid, e.g. "variance must be > 0".
CheckFn = Callable[[float], "str | None"]


def format_strength(value: float, *, scientific: bool = False) -> str:
    """Compact number for labels: ``1e-3`` (scientific) or ``30``/``12.5``."""
    if scientific and value != 0 and math.isfinite(value):
        mantissa, exp = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exp)}"
    return f"{value:g}"


def _show(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value)


@dataclass(frozen=True)
class Defense:
    """A defense with its strength fixed; call it on a list of gradients."""

    name: str
    family: str
    parameter: str | None
    strength: float | None
    label: str
    randomised: bool
    _apply: ApplyFn = field(repr=False, compare=False)

    def __call__(
        self, grads: Sequence[Tensor], *, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        grads = list(grads)
        for i, g in enumerate(grads):
            if not isinstance(g, Tensor):
                raise TypeError(
                    f"defense {self.name}: grads[{i}] is {type(g).__name__}, not a Tensor"
                )
            if not g.is_floating_point():
                raise TypeError(
                    f"defense {self.name}: grads[{i}] has non-float dtype {g.dtype}"
                )
        if self.randomised and generator is None:
            raise ValueError(
                f"defense {self.name} is randomised: pass generator=torch.Generator"
            )
        out = self._apply(grads, self.strength, generator)
        return out


@dataclass(frozen=True)
class DefenseKind:
    """A registered defense family member, before its strength is chosen.

    ``parameter`` names the strength (``"variance"``, ``"sparsity"``, ``"bits"`` or
    ``None``); ``default_grid`` holds the paper's strengths. ``fixed_strength`` is
    set for defenses without a user-settable strength (precision: the bit width):
    ``None`` means "use it", any other value must equal it.
    """

    name: str
    family: str
    parameter: str | None
    default_grid: tuple[float, ...]
    apply: ApplyFn = field(repr=False, compare=False)
    randomised: bool = False
    check: CheckFn | None = field(default=None, repr=False, compare=False)
    fixed_strength: float | None = None
    label_fn: Callable[[float | None], str] | None = field(
        default=None, repr=False, compare=False
    )
    description: str = ""

    def validate(self, strength: object, *, key: str = "defense") -> float | None:
        """Return the strength as a float (or None); raise a one-line UserError."""
        where = f"{key}.{self.name}"
        if self.parameter is None:
            if strength is not None:
                raise UserError(
                    f"{where}: takes no strength, got {_show(strength)}; omit it"
                )
            return None
        if strength is None:
            if self.fixed_strength is not None:
                return self.fixed_strength
            grid = ", ".join(format_strength(v) for v in self.default_grid)
            raise UserError(
                f"{where}: {self.parameter} is required (paper grid: {grid})"
            )
        value = _to_float(strength)
        if value is None:
            raise UserError(
                f"{where}: {self.parameter} must be a number, got {_show(strength)}"
            )
        if self.fixed_strength is not None:
            if value != self.fixed_strength:
                raise UserError(
                    f"{where}: {self.parameter} is fixed at {format_strength(self.fixed_strength)}, "
                    f"got {_show(strength)}; omit it"
                )
            return value
        if not math.isfinite(value):
            raise UserError(
                f"{where}: {self.parameter} must be finite, got {_show(strength)}"
            )
        if self.check is not None:
            reason = self.check(value)
            if reason is not None:
                raise UserError(f"{where}: {reason}, got {_show(strength)}")
        return value

    def make(self, strength: object = None, *, key: str = "defense") -> Defense:
        value = self.validate(strength, key=key)
        label = self.label_fn(value) if self.label_fn is not None else self.name
        return Defense(
            name=self.name,
            family=self.family,
            parameter=self.parameter,
            strength=value,
            label=label,
            randomised=self.randomised,
            _apply=self.apply,
        )


def _to_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # e.g. "1e-3" read from YAML as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


DEFENSES: Registry[DefenseKind] = Registry("defense")


def make_defense(
    name: str, strength: float | None = None, *, key: str = "defense"
) -> Defense:
    """Look up ``name`` and fix its strength; bad name/strength -> one-line UserError."""
    return DEFENSES.get(name, key=key).make(strength, key=key)


def _identity(
    grads: Sequence[Tensor], strength: float | None, generator: object
) -> list[Tensor]:
    # Clones rather than the same tensor objects, so that a caller that mutates
    # the "defended" gradients (e.g. an in-place optimizer) cannot touch the input.
    return [g.clone() for g in grads]


DEFENSES.register(
    "none",
    DefenseKind(
        name="none",
        family="none",
        parameter=None,
        default_grid=(),
        apply=_identity,
        description="no defense (identity; returns clones)",
    ),
)

# Family modules register themselves on import (explicit, no discovery).
from defenses import noise as noise  # noqa: E402
from defenses import precision as precision  # noqa: E402
from defenses import sparsity as sparsity  # noqa: E402
