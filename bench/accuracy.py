"""Accuracy cost of each defense: train a model on defended gradients, store its test accuracy.

A preset's ``[training]`` table turns into accuracy jobs, one per (training dataset,
defense setting of the preset, training seed)::

    [training]
    datasets = ["mnist", "cifar10"]   # registered datasets with a train split
    model = "convnet"                 # a registered trainable model
    epochs = 8                        # positive integer
    batch_size = 64                   # global minibatch, split over the workers (>= workers)
    workers = 4                       # K simulated data-parallel workers
    lr = 0.05                         # peak learning rate (cosine annealed to 0)
    momentum = 0.9                    # in [0, 1)
    weight_decay = 5e-4               # >= 0
    seeds = [0]                       # training replicates (default: the preset's seeds)
    train_limit = 5000                # optional cap on training images (seeded random subset)
    augment = false                   # random crop + horizontal flip

Only ``datasets``, ``model`` and ``epochs`` are required; the defaults of the other
keys are those shown above (``train_limit``: no cap; ``seeds``: the preset's).

Training is :func:`bench.training.train_and_evaluate`: synchronous data-parallel SGD
where each of the K workers' shard gradients goes through the defense before the
server averages them. Images are prepared exactly like the leakage part's: 3 channels
(gray replicated), ``preset.image_size`` x ``image_size`` (32 x 32), values in [0, 1].
The training subset (``train_limit``) is drawn with the fixed seed
:data:`SUBSET_SEED` for every job, so all defenses and replicate seeds of a dataset
train on the same images; the test split is used whole. The replicate seed sets
the model init, data order, augmentation and defense noise.

Each job has a stable id (hash of its canonical spec, like ``Cell.cell_id``); its
result is written atomically to ``out/accuracy/<job_id>.json`` = ``{"spec", "row"}``,
so a rerun skips finished jobs and a changed budget is a new job.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import selectable_field, spec_id
from bench.errors import UserError
from bench.store import atomic_write_json

__all__ = [
    "ACCURACY_COLUMNS",
    "AccuracyJob",
    "SUBSET_SEED",
    "accuracy_jobs",
    "collect_accuracy",
    "JOB_ONLY_KEYS",
    "parse_training",
    "pending_jobs",
    "resolve_training_datasets",
    "run_accuracy",
    "split_description",
]

#: Seed of the ``train_limit`` subset (the same images for every job of a dataset).
SUBSET_SEED = 0
TRAINING_KEYS = ("datasets", "model", "epochs", "batch_size", "workers", "lr", "momentum", "weight_decay", "seeds",
                 "train_limit", "augment")  # fmt: skip
DEFAULTS: dict[str, Any] = {"batch_size": 64, "workers": 4, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                            "train_limit": None, "augment": False}  # fmt: skip
#: Keys of a job that define its training budget (the clean baseline must share them).
BUDGET_KEYS = ("model", "epochs", "batch_size", "workers", "lr", "momentum", "weight_decay", "train_limit", "augment",
               "image_size")  # fmt: skip
#: Documented row columns, in order (versions follow).
ACCURACY_COLUMNS: tuple[str, ...] = (
    "job_id", "preset", "dataset", "model", "defense", "family", "parameter", "strength", "defense_label", "seed",
    "epochs", "epochs_run", "steps", "batch_size", "workers", "lr", "momentum", "weight_decay", "augment",
    "train_limit", "image_size", "train_images", "test_images", "num_classes", "split", "train_origin",
    "test_origin", "test_accuracy", "train_loss", "diverged", "seconds", "device",
)  # fmt: skip
#: ``--only`` keys that apply to accuracy jobs (``model`` and ``attack`` name the attacked model, not this one).
JOB_ONLY_KEYS = ("dataset", "defense", "family", "strength", "seed")
#: Size of each dataset's full official train split, to say "subset" in split descriptions.
FULL_TRAIN = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "digits": 1_437}
DISPLAY = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "lfw": "LFW",
           "digits": "digits", "lfw-faces": "lfw-faces"}  # fmt: skip


@dataclass(frozen=True)
class AccuracyJob:
    """One training run: a dataset, a defense setting, a seed and the budget."""

    dataset: str
    model: str
    defense: str
    strength: float | None
    seed: int
    epochs: int
    batch_size: int
    workers: int
    lr: float
    momentum: float
    weight_decay: float
    train_limit: int | None
    augment: bool
    image_size: int = 32
    preset: str = ""

    def spec(self) -> dict[str, Any]:
        """Canonical spec: everything that changes the outcome (not the preset's name)."""
        d = asdict(self)
        d.pop("preset")
        d["kind"] = "accuracy"
        d["channels"] = 3
        d["subset_seed"] = SUBSET_SEED
        return d

    @property
    def job_id(self) -> str:
        return spec_id(self.spec())

    def field(self, key: str) -> Any:
        """Value for ``--only KEY=...`` filtering (see :data:`JOB_ONLY_KEYS`)."""
        return selectable_field(self, key)

    def config(self):
        from bench.training import TrainConfig

        return TrainConfig(model=self.model, epochs=self.epochs, batch_size=self.batch_size, workers=self.workers,
                           lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed,
                           augment=self.augment)  # fmt: skip


# ---------------------------------------------------------------------- validation


def _err(where: str, key: str, msg: str) -> UserError:
    return UserError(f"{where}: training.{key}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_training(training: dict[str, Any], *, where: str, default_seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """Validate a ``[training]`` table; return it with defaults filled in.

    Errors are one-line :class:`UserError` naming the key, e.g.
    ``paper.toml: training.epochs: must be a positive integer, got 0``.
    """
    from bench.data import DATASETS
    from bench.models import MODELS

    if not isinstance(training, dict):
        raise UserError(f"{where}: training: must be a table")
    unknown = sorted(set(training) - set(TRAINING_KEYS))
    if unknown:
        raise _err(where, unknown[0], f"unknown key; allowed: {', '.join(TRAINING_KEYS)}")
    for key in ("datasets", "model", "epochs"):
        if key not in training:
            raise _err(where, key, "missing (required: datasets, model, epochs)")
    t = {**DEFAULTS, "seeds": list(default_seeds), **training}

    datasets = t["datasets"]
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
        raise _err(where, "datasets", f"must be a non-empty list of dataset names, got {datasets!r}")
    for d in datasets:
        if d not in DATASETS:
            raise _err(where, "datasets", f"unknown dataset {d!r}; allowed: {', '.join(DATASETS.names())}")
        if "train" not in DATASETS.get(d).splits:
            with_train = [n for n in DATASETS.names() if "train" in DATASETS.get(n).splits]
            raise _err(where, "datasets", f"{d!r} has no train split; datasets with one: {', '.join(with_train)}")
    if len(set(datasets)) != len(datasets):
        raise _err(where, "datasets", f"duplicate entries in {datasets!r}")

    model = t["model"]
    if not isinstance(model, str) or model not in MODELS:
        raise _err(where, "model", f"unknown model {model!r}; allowed: {', '.join(MODELS.names())}")
    if not MODELS.get(model).trainable:
        raise _err(where, "model", f"{model!r} is not trainable")

    for key in ("epochs", "batch_size", "workers"):
        if not _is_int(t[key]) or t[key] < 1:
            raise _err(where, key, f"must be a positive integer, got {t[key]!r}")
    if t["batch_size"] < t["workers"]:
        raise _err(where, "batch_size", f"must be >= workers ({t['workers']}) so every worker gets a shard, "
                                        f"got {t['batch_size']}")  # fmt: skip
    if not _is_number(t["lr"]) or t["lr"] <= 0:
        raise _err(where, "lr", f"must be a finite number > 0, got {t['lr']!r}")
    if not _is_number(t["momentum"]) or not 0 <= t["momentum"] < 1:
        raise _err(where, "momentum", f"must be a number in [0, 1), got {t['momentum']!r}")
    if not _is_number(t["weight_decay"]) or t["weight_decay"] < 0:
        raise _err(where, "weight_decay", f"must be a finite number >= 0, got {t['weight_decay']!r}")
    seeds = t["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise _err(where, "seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(where, "seeds", f"duplicate entries in {seeds!r}")
    limit = t["train_limit"]
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise _err(where, "train_limit", f"must be a positive integer (or omitted for no cap), got {limit!r}")
    if not isinstance(t["augment"], bool):
        raise _err(where, "augment", f"must be true or false, got {t['augment']!r}")
    return {**t, "lr": float(t["lr"]), "momentum": float(t["momentum"]), "weight_decay": float(t["weight_decay"])}


def accuracy_jobs(preset, datasets: Sequence[str] | None = None) -> list[AccuracyJob]:
    """Jobs of a preset's ``[training]`` table: datasets x defense settings x seeds.

    ``datasets`` restricts (and orders) the training datasets, e.g. to those whose
    train split is present (see :func:`resolve_training_datasets`); ``None`` means the
    table's ``datasets``. A dataset given here need not be listed in the table
    (e.g. the embedded ``digits`` fallback). A preset without ``[training]`` has no jobs.
    """
    if not preset.training:
        return []
    where = f"{preset.name}.toml"
    t = parse_training(preset.training, where=where, default_seeds=preset.seeds)
    names = list(t["datasets"]) if datasets is None else list(datasets)
    jobs = []
    for ds in names:
        for defense, strength in preset.defenses:
            for seed in t["seeds"]:
                jobs.append(AccuracyJob(
                    dataset=ds, model=t["model"], defense=defense, strength=strength, seed=seed,
                    epochs=t["epochs"], batch_size=t["batch_size"], workers=t["workers"], lr=t["lr"],
                    momentum=t["momentum"], weight_decay=t["weight_decay"], train_limit=t["train_limit"],
                    augment=t["augment"], image_size=preset.image_size, preset=preset.name,
                ))  # fmt: skip
    return jobs


def resolve_training_datasets(preset, root: Path) -> tuple[list[str], list[str]]:
    """Training datasets whose train and test splits are present, and notices for the report.

    Applies the preset's ``on_missing_data`` policy to missing ones: ``error`` raises,
    ``skip`` drops them; ``embedded`` drops them too and, if none is left, trains on the
    embedded ``digits`` dataset instead (the only embedded one with a train split).
    """
    from bench.data import available, load_split

    if not preset.training:
        return [], []
    t = parse_training(preset.training, where=f"{preset.name}.toml", default_seeds=preset.seeds)
    present = [d for d in t["datasets"] if available(d, root, split="train") and available(d, root, split="test")]
    missing = [d for d in t["datasets"] if d not in present]
    if not missing:
        return present, []
    if preset.on_missing_data == "error":
        split = "train" if not available(missing[0], root, split="train") else "test"
        load_split(missing[0], split=split, size=preset.image_size, channels=3, root=root)  # raises the one-line error
    if present or preset.on_missing_data == "skip":
        return present, [f"Accuracy: skipped training datasets without train/test splits under {root}: "
                         f"{', '.join(missing)}."]  # fmt: skip
    return ["digits"], [f"Accuracy: none of the training datasets {', '.join(missing)} has train and test splits "
                        f"under {root}; the accuracy jobs trained on the embedded digits dataset instead."]


# ------------------------------------------------------------------------ running


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def split_description(dataset: str, train_images: int, test_images: int) -> str:
    """``MNIST 5k train subset / 10k test``: "subset" when fewer than the official train split."""
    full = FULL_TRAIN.get(dataset)
    subset = " subset" if full is not None and train_images < full else ""
    return f"{DISPLAY.get(dataset, dataset)} {_count(train_images)} train{subset} / {_count(test_images)} test"


def _job_path(out: Path, job_id: str) -> Path:
    return Path(out) / "accuracy" / f"{job_id}.json"


def _done(out: Path, job_id: str) -> bool:
    path = _job_path(out, job_id)
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # a damaged result is recomputed
    return isinstance(stored, dict) and isinstance(stored.get("row"), dict)


def pending_jobs(jobs: Sequence[AccuracyJob], out: Path) -> list[AccuracyJob]:
    """The jobs without a stored result under ``out`` (what :func:`run_accuracy` would run)."""
    return [j for j in jobs if not _done(Path(out), j.job_id)]


def run_accuracy(jobs: Sequence[AccuracyJob], *, out: Path, data_root: str | Path | None, device: str = "cpu",
                 progress: Callable[[float], None] | None = None) -> dict:  # fmt: skip
    """Run the jobs not yet stored; write each result to ``out/accuracy/<job_id>.json``.

    ``progress(position)`` is called with the number of jobs to run that are
    finished so far, fractional within a job (0 .. ``ran``), e.g.
    ``lambda x: bar.update(x - bar.n)`` for a tqdm bar of ``total=ran``.
    Each dataset's train and test splits are loaded once per call. Thread
    settings are left to the caller. Returns ``{"jobs", "skipped", "ran", "seconds"}``.
    """
    from bench.data import load_split
    from bench.runner import versions
    from bench.training import train_and_evaluate
    from defenses import make_defense

    out = Path(out)
    todo = pending_jobs(jobs, out)
    started = time.perf_counter()
    cache: dict[tuple, tuple] = {}
    vers = versions() if todo else {}
    for k, job in enumerate(todo):
        key = (job.dataset, job.train_limit, job.image_size)
        if key not in cache:
            train = load_split(job.dataset, split="train", size=job.image_size, channels=3, root=data_root,
                               limit=job.train_limit, seed=SUBSET_SEED)  # fmt: skip
            test = load_split(job.dataset, split="test", size=job.image_size, channels=3, root=data_root)
            cache[key] = (train, test)
        train, test = cache[key]
        num_classes = max(train.num_classes, test.num_classes)
        defense = make_defense(job.defense, job.strength)
        tick = (lambda f, k=k: progress(k + min(f, 1.0))) if progress else None
        result = train_and_evaluate(job.config(), train.images, train.labels, test.images, test.labels, num_classes,
                                    defense, device=device, progress=tick)  # fmt: skip
        row = {
            "job_id": job.job_id, "preset": job.preset, "dataset": job.dataset, "model": job.model,
            "defense": job.defense, "family": defense.family, "parameter": defense.parameter,
            "strength": job.strength, "defense_label": defense.label, "seed": job.seed, "epochs": job.epochs,
            "epochs_run": result["epochs"], "steps": result["steps"], "batch_size": job.batch_size,
            "workers": job.workers, "lr": job.lr, "momentum": job.momentum, "weight_decay": job.weight_decay,
            "augment": job.augment, "train_limit": job.train_limit, "image_size": job.image_size,
            "train_images": len(train), "test_images": len(test), "num_classes": num_classes,
            "split": split_description(job.dataset, len(train), len(test)), "train_origin": train.origin,
            "test_origin": test.origin, "test_accuracy": result["test_accuracy"], "train_loss": result["train_loss"],
            "diverged": bool(result["diverged"]), "seconds": result["seconds"], "device": str(device), **vers,
        }  # fmt: skip
        atomic_write_json(_job_path(out, job.job_id), {"spec": job.spec(), "row": row})
        if progress:
            progress(k + 1.0)
    return {"jobs": len(jobs), "skipped": len(jobs) - len(todo), "ran": len(todo),
            "seconds": time.perf_counter() - started}  # fmt: skip


# ------------------------------------------------------------------------- reading


def collect_accuracy(out: Path, jobs: Sequence[AccuracyJob] | None = None) -> pd.DataFrame:
    """All stored accuracy rows (sorted by job id), with ``clean_accuracy`` and ``drop``.

    ``clean_accuracy`` is the test accuracy of the ``none`` job with the same dataset,
    seed and training budget (:data:`BUDGET_KEYS`); ``drop = clean_accuracy -
    test_accuracy`` (a fraction; NaN without a clean job). ``jobs`` keeps only those
    jobs' rows (e.g. the current preset's, ignoring results of an older budget).
    An empty frame with the documented columns when nothing is stored.
    """
    folder = Path(out) / "accuracy"
    files = sorted(p for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []
    wanted = {j.job_id for j in jobs} if jobs is not None else None
    rows = []
    for path in files:
        if wanted is not None and path.stem not in wanted:
            continue
        try:
            stored = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable accuracy result ({type(exc).__name__}); delete it and rerun "
                            "to recompute it") from None
        row = stored.get("row") if isinstance(stored, dict) else None
        if not isinstance(row, dict):
            raise UserError(f"{path}: expected an object with a row; delete it and rerun to recompute it")
        rows.append(row)
    columns = [*ACCURACY_COLUMNS, "clean_accuracy", "drop"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame.from_records(rows)
    for c in ACCURACY_COLUMNS:
        if c not in frame:
            frame[c] = None
    keys = ["dataset", "seed", *BUDGET_KEYS]
    key_of = [tuple(_hashable(v) for v in r) for r in frame[keys].itertuples(index=False, name=None)]
    clean: dict[tuple, float] = {}
    for key, defense, acc in zip(key_of, frame["defense"], frame["test_accuracy"]):
        if defense == "none":
            clean.setdefault(key, float(acc))
    frame["clean_accuracy"] = [clean.get(key, math.nan) for key in key_of]
    frame["drop"] = frame["clean_accuracy"] - frame["test_accuracy"].astype(float)
    extra = sorted(set(frame.columns) - set(columns))
    return frame.reindex(columns=[*columns, *extra]).reset_index(drop=True)


def _hashable(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v
