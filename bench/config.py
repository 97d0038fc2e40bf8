"""Presets (TOML) -> a validated matrix of cells, each with a stable id.

A preset file::

    description = "..."
    datasets = ["mnist", "cifar10"]     # dataset registry names
    models = ["lenet-dlg"]
    images = 4                          # victim images per dataset (chosen with image_seed)
    image_seed = 0
    seeds = [0]                         # replicates: model weights, dummy init and defense noise
    batch_sizes = [1]                   # victim batch size B
    on_missing_data = "embedded"        # error | skip | embedded
    success = { metric = "mse", threshold = 1e-3 }

    [attacks.dlg]                       # attack name -> settings overriding its defaults
    steps = 300

    [defenses]                          # name -> list of strengths, or true (no strength)
    none = true
    gaussian = [1e-4, 1e-3, 1e-2, 1e-1]

A cell is one (dataset, model, attack, defense setting, batch size, seed) combination;
it attacks ``images`` victim batches. ``cell_id`` is a hash of the canonical cell spec,
so a rerun skips cells already stored and a changed spec is a new cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attacks import ATTACKS
from bench.data import DATASETS
from bench.errors import UserError
from bench.metrics import SuccessRule, parse_success
from bench.models import MODELS
from defenses import DEFENSES, make_defense

PRESET_DIR = Path(__file__).parent / "presets"
MISSING_POLICIES = ("error", "skip", "embedded")
_KEYS = {"description", "datasets", "models", "images", "image_seed", "seeds", "batch_sizes",
         "on_missing_data", "success", "attacks", "defenses", "image_size", "training", "snapshot_steps"}
ONLY_KEYS = ("dataset", "model", "attack", "defense", "family", "strength", "batch_size", "seed")


def spec_id(spec: dict[str, Any]) -> str:
    """Stable id of a canonical spec: the first 16 hex digits of the sha256 of its sorted, compact JSON."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def selectable_field(item: Any, key: str) -> Any:
    """``item.key`` for ``--only`` filtering (:func:`select`); ``family`` is the defense's family."""
    if key == "family":
        return DEFENSES.get(item.defense).family
    return getattr(item, key)


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    attack: str
    attack_settings: dict[str, Any] = field(hash=False)
    defense: str
    strength: float | None
    batch_size: int
    seed: int
    images: int
    image_seed: int
    image_size: int

    def spec(self) -> dict[str, Any]:
        """Canonical spec; everything that changes the outcome, nothing that does not (engine)."""
        d = asdict(self)
        d["attack_settings"] = {k: v for k, v in sorted(self.attack_settings.items()) if k != "engine"}
        return d

    @property
    def cell_id(self) -> str:
        return spec_id(self.spec())

    def field(self, key: str) -> Any:
        return selectable_field(self, key)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    datasets: list[str]
    models: list[str]
    attacks: dict[str, dict[str, Any]]
    defenses: list[tuple[str, float | None]]
    images: int
    image_seed: int
    seeds: list[int]
    batch_sizes: list[int]
    on_missing_data: str
    success: SuccessRule
    image_size: int = 32
    training: dict[str, Any] = field(default_factory=dict)
    snapshot_steps: tuple[int, ...] = ()  # optimizer steps at which reconstructions are kept (figures)

    def cells(self, datasets: list[str] | None = None) -> list[Cell]:
        out = []
        for ds, model, (attack, settings), (defense, strength), bs, seed in itertools.product(
            datasets if datasets is not None else self.datasets, self.models, self.attacks.items(),
            self.defenses, self.batch_sizes, self.seeds,
        ):
            out.append(Cell(ds, model, attack, settings, defense, strength, bs, seed, self.images,
                            self.image_seed, self.image_size))
        return out


def _err(path: str, key: str, msg: str) -> UserError:
    return UserError(f"{path}: {key}: {msg}")


def _list_of(path: str, key: str, value: Any, kind: type, registry=None) -> list:
    if not isinstance(value, list) or not value:
        raise _err(path, key, f"must be a non-empty list, got {value!r}")
    for v in value:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise _err(path, key, f"entries must be {kind.__name__}, got {v!r}")
        if registry is not None and v not in registry:
            raise _err(path, key, f"unknown {registry.kind} {v!r}; allowed: {', '.join(registry.names())}")
    return value


def load_preset(name_or_path: str) -> Preset:
    """Read and validate a preset by name (bench/presets/NAME.toml) or path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
            raise UserError(f"unknown preset {name_or_path!r}; allowed: {names} (or a path to a .toml file)")
    if not path.is_file():
        raise UserError(f"preset file {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: malformed TOML: {exc}") from None
    return parse_preset(raw, name=path.stem, where=str(path))


def parse_preset(raw: dict[str, Any], *, name: str, where: str) -> Preset:
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _err(where, unknown[0], f"unknown key; allowed: {', '.join(sorted(_KEYS))}")
    for key in ("datasets", "models", "attacks", "defenses", "success"):
        if key not in raw:
            raise _err(where, key, "missing")
    datasets = _list_of(where, "datasets", raw["datasets"], str, DATASETS)
    models = _list_of(where, "models", raw["models"], str, MODELS)
    images = raw.get("images", 4)
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise _err(where, "images", f"must be a positive integer, got {images!r}")
    image_seed = raw.get("image_seed", 0)
    if not isinstance(image_seed, int):
        raise _err(where, "image_seed", f"must be an integer, got {image_seed!r}")
    seeds = _list_of(where, "seeds", raw.get("seeds", [0]), int)
    batch_sizes = _list_of(where, "batch_sizes", raw.get("batch_sizes", [1]), int)
    if any(b < 1 for b in batch_sizes):
        raise _err(where, "batch_sizes", f"must be >= 1, got {batch_sizes}")
    policy = raw.get("on_missing_data", "error")
    if policy not in MISSING_POLICIES:
        raise _err(where, "on_missing_data", f"unknown policy {policy!r}; allowed: {', '.join(MISSING_POLICIES)}")
    image_size = raw.get("image_size", 32)
    if not isinstance(image_size, int) or image_size < 8:
        raise _err(where, "image_size", f"must be an integer >= 8, got {image_size!r}")

    attacks: dict[str, dict[str, Any]] = {}
    if not isinstance(raw["attacks"], dict) or not raw["attacks"]:
        raise _err(where, "attacks", "must be a table of attack name -> settings, e.g. [attacks.dlg]")
    for att, settings in raw["attacks"].items():
        kind = ATTACKS.get(att, key=f"{where}: attacks")
        if not isinstance(settings, dict):
            raise _err(where, f"attacks.{att}", "must be a table of settings")
        bad = sorted(set(settings) - set(kind.defaults))
        if bad:
            raise _err(where, f"attacks.{att}.{bad[0]}", f"unknown setting; allowed: {', '.join(kind.defaults)}")
        resolved = {**kind.defaults, **settings}
        try:
            kind.make(**resolved)  # validates values
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        attacks[att] = resolved

    defenses: list[tuple[str, float | None]] = []
    if not isinstance(raw["defenses"], dict) or not raw["defenses"]:
        raise _err(where, "defenses", "must be a table of defense name -> strengths (list) or true")
    for dname, strengths in raw["defenses"].items():
        DEFENSES.get(dname, key=f"{where}: defenses")
        key = f"{where}: defenses.{dname}"
        if strengths is True:
            defenses.append((dname, make_defense(dname, None, key=key).strength))
        elif isinstance(strengths, list) and strengths:
            for s in strengths:
                if isinstance(s, bool) or not isinstance(s, (int, float)):
                    raise UserError(f"{key}: strengths must be numbers, got {s!r}")
                defenses.append((dname, make_defense(dname, float(s), key=key).strength))
        else:
            raise UserError(f"{key}: must be a non-empty list of strengths or true, got {strengths!r}")

    success = parse_success(raw["success"], key=f"{where}: success")
    training = raw.get("training", {})
    if not isinstance(training, dict):
        raise _err(where, "training", "must be a table")
    snaps = raw.get("snapshot_steps", [])
    if not isinstance(snaps, list) or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in snaps):
        raise _err(where, "snapshot_steps", f"must be a list of step numbers >= 0, got {snaps!r}")
    return Preset(name=name, description=str(raw.get("description", "")), datasets=datasets, models=models,
                  attacks=attacks, defenses=defenses, images=images, image_seed=image_seed, seeds=seeds,
                  batch_sizes=batch_sizes, on_missing_data=policy, success=success, image_size=image_size,
                  training=training, snapshot_steps=tuple(sorted(set(snaps))))


def parse_only(items: list[str] | None) -> dict[str, set[str]]:
    """``--only KEY=V1,V2`` (repeatable; keys AND together, values OR)."""
    out: dict[str, set[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UserError(f"--only {item!r}: expected KEY=V1,V2 with KEY one of {', '.join(ONLY_KEYS)}")
        if key not in ONLY_KEYS:
            raise UserError(f"--only {key}: unknown key; allowed: {', '.join(ONLY_KEYS)}")
        out.setdefault(key, set()).update(v.strip() for v in values.split(","))
    return out


def _matches(value: Any, wanted: set[str]) -> bool:
    if value is None:
        return "none" in wanted or "None" in wanted
    if isinstance(value, float):
        return any(_as_float(w) == value for w in wanted)
    return str(value) in wanted


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def select(cells: list[Cell], only: dict[str, set[str]]) -> list[Cell]:
    return [c for c in cells if all(_matches(c.field(k), v) for k, v in only.items())]
