"""Gradient-inversion attacks. Each family registers itself in :data:`ATTACKS` on import."""

from attacks import dlg  # noqa: E402,F401  (registers dlg, idlg)
from attacks.base import ATTACKS, AttackBatch, AttackKind, AttackResult, Lane

__all__ = ["ATTACKS", "AttackBatch", "AttackKind", "AttackResult", "Lane"]
