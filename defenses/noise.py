"""Additive noise defenses (DLG paper, Sec. 5: "noisy gradients").

The strength is the noise VARIANCE sigma^2, as in the DLG paper (grid 1e-4, 1e-3,
1e-2, 1e-1), not the standard deviation.

* ``gaussian``: g + N(0, variance), i.i.d. per entry.
* ``laplacian``: g + Laplace(0, b) with b = sqrt(variance / 2), i.e. the SAME
  variance 2 b^2 as the Gaussian at that strength (heavier tails: excess kurtosis 3).

Randomness: all noise comes from the ``generator`` passed to the defense. It is
drawn in float32 on the generator's device (a CPU generator draws on the CPU) and
then moved to the gradient's device and cast to its dtype, so the result for a
given seed does not depend on where the gradients live. Tensors are processed in
list order, each consuming ``numel`` draws. Laplace noise is sampled by inverse CDF
from the generator's uniform draws (``torch.distributions`` takes no generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from defenses import DEFENSES, DefenseKind, format_strength

VARIANCE_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)


def _check_variance(value: float) -> str | None:
    return None if value > 0 else "variance must be > 0"


def _draw_device(generator: torch.Generator) -> torch.device:
    return generator.device


def gaussian_noise(
    shape: torch.Size, variance: float, generator: torch.Generator
) -> Tensor:
    """float32 N(0, variance) samples on the generator's device."""
    z = torch.randn(
        shape, generator=generator, device=_draw_device(generator), dtype=torch.float32
    )
    return z * math.sqrt(variance)


def laplace_noise(
    shape: torch.Size, variance: float, generator: torch.Generator
) -> Tensor:
    """float32 Laplace(0, b = sqrt(variance/2)) samples via inverse CDF.

    u ~ U[-1/2, 1/2);  x = -b * sign(u) * log(1 - 2|u|)   (the log's argument is
    clamped to the smallest positive float32 so the u = -1/2 draw stays finite).
    """
    b = math.sqrt(variance / 2.0)
    u = (
        torch.rand(
            shape,
            generator=generator,
            device=_draw_device(generator),
            dtype=torch.float32,
        )
        - 0.5
    )
    tail = (1.0 - 2.0 * u.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    return -b * torch.sign(u) * torch.log(tail)


def _additive(sampler):
    def apply(
        grads: Sequence[Tensor],
        variance: float | None,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        assert variance is not None and generator is not None
        out = []
        for g in grads:
            noise = sampler(g.shape, variance, generator).to(
                device=g.device, dtype=g.dtype
            )
            out.append(g + noise)
        return out

    return apply


def _label(name: str):
    return lambda v: f"{name} var={format_strength(v, scientific=True)}"


DEFENSES.register(
    "gaussian",
    DefenseKind(
        name="gaussian",
        family="noise",
        parameter="variance",
        default_grid=VARIANCE_GRID,
        apply=_additive(gaussian_noise),
        randomised=True,
        check=_check_variance,
        label_fn=_label("gaussian"),
        description="add i.i.d. Gaussian noise N(0, variance)",
    ),
)

DEFENSES.register(
    "laplacian",
    DefenseKind(
        name="laplacian",
        family="noise",
        parameter="variance",
        default_grid=VARIANCE_GRID,
        apply=_additive(laplace_noise),
        randomised=True,
        check=_check_variance,
        label_fn=_label("laplacian"),
        description="add i.i.d. Laplace noise with the given variance (b = sqrt(variance/2))",
    ),
)
