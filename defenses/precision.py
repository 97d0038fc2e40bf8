"""Low-precision gradient defenses (DLG paper, Sec. 5: "half precision / int8").

The strength is the bit width (16, 16, 8), used only for plots; it is not
user-settable (passing a different value is a UserError).

* ``fp16``: cast to ``torch.float16`` and back to the original dtype (values
  beyond +-65504 become +-inf, tiny values flush to (sub)normals/zero).
* ``bf16``: cast to ``torch.bfloat16`` and back to the original dtype.
* ``int8``: symmetric per-tensor quantisation to 255 levels::

      scale = max|g| / 127
      q     = clamp(round(g / scale), -127, 127)      (round half to even)
      deq   = q * scale

  so |g - deq| <= scale / 2 and deq takes at most 255 distinct values. An
  all-zero (or empty) tensor stays zero. The arithmetic is done in float32 (or
  float64 for float64 gradients) and the result cast back to the input dtype.
  Gradients are assumed finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from defenses import DEFENSES, DefenseKind

INT8_LEVELS = 127  # q in [-127, 127]: 255 levels


def _cast_roundtrip(dtype: torch.dtype):
    def apply(
        grads: Sequence[Tensor], strength: float | None, generator: object
    ) -> list[Tensor]:
        # copy=True: an input already in ``dtype`` must still come back as a new tensor.
        return [g.to(dtype).to(g.dtype, copy=True) for g in grads]

    return apply


def quantize_int8(g: Tensor) -> Tensor:
    """Symmetric per-tensor int8 quantise-dequantise of one tensor (see module doc)."""
    work_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.to(work_dtype)
    if x.numel() == 0:
        return g.clone()
    amax = x.abs().max()
    if amax == 0:
        return torch.zeros_like(g)
    scale = amax / INT8_LEVELS
    q = torch.round(x / scale).clamp(-INT8_LEVELS, INT8_LEVELS)
    return (q * scale).to(g.dtype)


def _int8(
    grads: Sequence[Tensor], strength: float | None, generator: object
) -> list[Tensor]:
    return [quantize_int8(g) for g in grads]


for _name, _dtype, _bits in (
    ("fp16", torch.float16, 16.0),
    ("bf16", torch.bfloat16, 16.0),
):
    DEFENSES.register(
        _name,
        DefenseKind(
            name=_name,
            family="precision",
            parameter="bits",
            default_grid=(_bits,),
            apply=_cast_roundtrip(_dtype),
            fixed_strength=_bits,
            label_fn=lambda v, n=_name: n,
            description=f"cast to {_dtype} and back",
        ),
    )

DEFENSES.register(
    "int8",
    DefenseKind(
        name="int8",
        family="precision",
        parameter="bits",
        default_grid=(8.0,),
        apply=_int8,
        fixed_strength=8.0,
        label_fn=lambda v: "int8",
        description="symmetric per-tensor int8 quantisation (scale = max|g|/127, 255 levels)",
    ),
)
