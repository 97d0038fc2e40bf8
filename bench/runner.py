"""Matrix runner: cells -> work units -> executor -> records in the store.

A work unit holds whole cells that share dataset, model, attack and victim batch size,
so their lanes (one per victim batch) run as one batched attack. The driver alone
writes the store; workers return results.

Random numbers, all derived from the cell's replicate ``seed`` by hashing, never the
global RNG:
* ``lane_seed`` = f(seed, dataset, model, victim image indices): the victim model's
  weights and the attack's dummy initialisation. It does not depend on the defense,
  so every defense of a dataset faces the same model from the same start (common
  random numbers: defense comparisons are paired).
* the defense's noise generator = f(lane_seed, defense, strength).
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import ATTACKS, AttackBatch, Lane
from attacks.compiling import eager_calls, eager_since
from attacks.dlg import victim_gradient
from bench.config import Cell, Preset
from bench.data import available, class_count, load_images
from bench.errors import UserError
from bench.metrics import score_images
from bench.models import build_model
from bench.store import Store, atomic_write_json
from defenses import DEFENSES, make_defense

EMBEDDED = ("digits", "lfw-faces")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and platforms)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def versions() -> dict[str, str]:
    import torchvision

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "git_rev": rev or "unknown"}


@dataclass
class Unit:
    cells: list[Cell]
    data_root: str
    device: str
    engine: str | None
    slots: int  # attacks computed together; the unit's other attacks queue for a slot
    snapshot_steps: tuple[int, ...] = ()

    @property
    def lanes(self) -> int:
        return sum(c.images for c in self.cells)


QUEUE_FACTOR = 4  # a unit holds up to this many times ``slots`` attacks
# ``--lanes auto``. On the CPU, attacks a single-threaded worker computes together: with the loop
# that alternates loss and round calls over all lanes (CUDA, no C compiler), two such workers on the
# 2-core Intel Xeon (``bench perf --workers 2``, 96 attacks, 2026-11-28) ran CIFAR-10 at 0.195,
# 0.202, 0.226 and 0.236 ms per lane-closure with 12, 8, 20 and 32 lanes, and MNIST at 0.194, 0.190,
# 0.215 and 0.236 (each lane's 2.5 MB history is read twice a round; more lanes read it from further
# away). Lane after lane (the C kernels) the count hardly matters: 0.166, 0.164, 0.165 with 6, 12, 32.
# On CUDA one process computes many more: ``bench perf --device cuda`` measured 0.05-0.07 ms per
# lane-closure at 256 lanes (NVIDIA H200).
AUTO_LANES = {"cpu": 12, "cuda": 256}
# On the CPU, a worker's lanes computed together hold at most this many bytes of weights and target
# gradients. Only LFW's 641-class last layer reaches it (4 MB per lane: 12 slots, not 32), and there
# 8-16 slots ran 12-23 % faster per lane-closure than 32 (two single-thread workers, Intel Xeon,
# 2026-11-27); CIFAR-100 (0.7 MB per lane) ran as fast with 16 as with 32, and keeps 32.
SLOT_BYTES = 48 << 20


def resolve_workers(value: object, device: str, *, flag: str = "--workers") -> int:
    """``auto``: one single-threaded process per CPU core (on 2 cores 1.2x the attack throughput of one
    process with 2 threads when the per-round bookkeeping ran in Python, 1.04x lane after lane); one on CUDA."""
    if value == "auto":
        return 1 if device == "cuda" else max(1, os.cpu_count() or 1)
    return _positive(flag, value)


def resolve_lanes(value: object, device: str, *, flag: str = "--lanes") -> int:
    """``auto``: :data:`AUTO_LANES` for the device; else a positive integer."""
    if value == "auto":
        return AUTO_LANES["cuda" if device == "cuda" else "cpu"]
    return _positive(flag, value)


def _positive(flag: str, value: object) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise UserError(f"{flag}: expected a positive integer or 'auto', got {value!r}")
    return n


def fit_slots(slots: int, lane: Lane) -> int:
    """``slots``, or fewer where that many lanes' weights and target gradients exceed SLOT_BYTES."""
    per_lane = sum(t.numel() * t.element_size() for t in (*lane.params.values(), *lane.target_grads.values()))
    return max(1, min(slots, SLOT_BYTES // max(1, per_lane)))


def plan_units(cells: list[Cell], slots: int, classes: dict[str, int] | None = None) -> list[list[Cell]]:
    """Group cells by (dataset, model, attack, settings, batch size); split each group into the
    fewest units of at most ``QUEUE_FACTOR * slots`` attacks, of near-equal size (whole cells),
    costliest first (see :func:`unit_cost`; ``classes``: dataset -> number of classes).

    A unit runs ``slots`` attacks at a time and refills a slot as soon as its attack stops
    (attacks stop after anywhere from 16 to 6,000 closures), so a unit several times
    ``slots`` keeps its batch full for most of its life.
    """
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        key = (c.dataset, c.model, c.attack, tuple(sorted(c.attack_settings.items())), c.batch_size,
               c.image_size, c.images, c.image_seed)
        groups.setdefault(key, []).append(c)
    units = []
    for group in groups.values():
        n = min(len(group), -(-sum(c.images for c in group) // (QUEUE_FACTOR * slots)))
        size, extra = divmod(len(group), n)
        start = 0
        for k in range(n):
            stop = start + size + (k < extra)
            units.append(group[start:stop])
            start = stop
    return sorted(units, key=lambda u: -unit_cost(u, classes or {}))


# Per closure, lenet-dlg's convolutions on 32x32 images cost about as much as the final layer's
# share of a 400-class dataset: ms per lane-closure per worker in the paper preset (Intel Xeon,
# 2026-11-27) 0.73-0.87 at 10 classes, 0.95-1.06 at CIFAR-100's 100, 2.27 at LFW's 641.
CLASS_COST = 400


def unit_cost(unit: list[Cell], classes: dict[str, int]) -> float:
    """A unit's estimated compute: attacks x victim batch x steps x (1 + classes / CLASS_COST).
    Units start costliest first, so that the longest ones do not start last and leave the other
    workers idle at the end of a run."""
    def steps(c: Cell) -> int:
        return c.attack_settings.get("steps", ATTACKS.get(c.attack).defaults.get("steps", 1))

    return sum(c.images * c.batch_size * steps(c) * (1 + classes.get(c.dataset, 0) / CLASS_COST) for c in unit)


def resolve_datasets(preset: Preset, wanted: list[str], root: Path, download: bool) -> tuple[list[str], list[str]]:
    """Which datasets to run, and notices for the report. Applies the preset's missing-data policy."""
    notices: list[str] = []
    present = [d for d in wanted if available(d, root) or (download and _try_download(d, root))]
    missing = [d for d in wanted if d not in present]
    if not missing:
        return present, notices
    if preset.on_missing_data == "error":
        load_images(missing[0], count=1, root=root, download=download)  # raises the one-line error
    if present or preset.on_missing_data == "skip":
        notices.append(f"Skipped datasets not found under {root}: {', '.join(missing)}.")
        return present, notices
    notices.append(f"None of the datasets {', '.join(missing)} was found under {root} (and none could be "
                   f"downloaded); this run used the embedded real datasets {', '.join(EMBEDDED)} instead. "
                   "Point --data-root or DLG_BENCH_DATA at the data for the card's datasets.")
    return list(EMBEDDED), notices


def _try_download(name: str, root: Path) -> bool:
    try:
        load_images(name, count=1, root=root, download=True)
        return True
    except UserError:
        return False


def run_unit(unit: Unit, progress: Callable[[float], None] | None = None) -> list[dict]:
    """Run every cell of a unit as one batched attack; return one result dict per cell."""
    first = unit.cells[0]
    B, n_img = first.batch_size, first.images
    data = load_images(first.dataset, count=n_img * B, seed=first.image_seed, size=first.image_size,
                       channels=3, root=unit.data_root)
    C = data.num_classes
    device = torch.device(unit.device)
    settings = dict(first.attack_settings)
    if unit.engine:
        settings["engine"] = unit.engine
    attack = ATTACKS.get(first.attack).make(**settings)
    arch = build_model(first.model, num_classes=C, channels=3, size=first.image_size)
    lanes: list[Lane] = []
    lane_info: list[tuple[Cell, int, int]] = []
    victims = {}
    for i in range(n_img):
        imgs = data.images[i * B:(i + 1) * B]
        labels = data.labels[i * B:(i + 1) * B]
        indices = data.indices[i * B:(i + 1) * B]
        for cell in unit.cells:
            lane_seed = derive_seed(cell.seed, cell.dataset, cell.model, *indices)
            if lane_seed not in victims:
                model = build_model(cell.model, num_classes=C, channels=3, size=cell.image_size,
                                    generator=torch.Generator().manual_seed(lane_seed))
                params = {k: v.detach() for k, v in model.named_parameters()}
                victims[lane_seed] = (params, victim_gradient(arch, params, imgs, labels, C))
            params, clean = victims[lane_seed]
            defense = make_defense(cell.defense, cell.strength)
            gen = torch.Generator().manual_seed(derive_seed(lane_seed, cell.defense, cell.strength))
            shared = dict(zip(clean, defense(list(clean.values()), generator=gen)))
            lanes.append(Lane(params=params, target_grads=shared, seed=derive_seed(lane_seed, "dummy")))
            lane_info.append((cell, i, lane_seed))
    # Lanes are image-major above; regroup cell-major so each cell's lanes are contiguous.
    order = sorted(range(len(lanes)), key=lambda k: (unit.cells.index(lane_info[k][0]), lane_info[k][1]))
    lanes = [lanes[k] for k in order]
    lane_info = [lane_info[k] for k in order]
    slots = fit_slots(unit.slots, lanes[0]) if device.type == "cpu" else unit.slots
    batch = AttackBatch(model=arch, image_shape=(3, first.image_size, first.image_size), num_classes=C,
                        batch_size=B, lanes=lanes, device=device, slots=slots)
    total_steps = attack.lbfgs.steps
    tick = (lambda k: progress(k * len(lanes) / total_steps)) if progress else None
    before = eager_calls()
    result = attack(batch, progress=tick, snapshot_steps=unit.snapshot_steps)
    eager = eager_since(before)
    seconds_per_lane = result.seconds / len(lanes)
    vers = versions()
    out = []
    for cell in unit.cells:
        rows, origs, recs, snaps = [], [], [], {k: [] for k in result.snapshots}
        for lane_k, (lane_cell, i, lane_seed) in enumerate(lane_info):
            if lane_cell is not cell:
                continue
            orig = data.images[i * B:(i + 1) * B]
            labels = data.labels[i * B:(i + 1) * B]
            rec = result.reconstructions[lane_k]
            scores = score_images(orig.numpy(), rec.numpy(), labels.tolist(), result.labels[lane_k].tolist())
            kind = DEFENSES.get(cell.defense)
            for slot, sc in enumerate(scores):
                rows.append({
                    "cell_id": cell.cell_id, "dataset": cell.dataset, "dataset_origin": data.origin,
                    "model": cell.model, "attack": cell.attack, "engine": settings.get("engine", ""),
                    "defense": cell.defense, "family": kind.family, "parameter": kind.parameter,
                    "strength": cell.strength, "defense_label": make_defense(cell.defense, cell.strength).label,
                    "batch_size": B, "image": int(data.indices[i * B + slot]), "slot": slot,
                    "seed": cell.seed, "lane_seed": lane_seed, **{k: float(v) for k, v in sc.items()},
                    "status": result.status[lane_k], "closures": int(result.closures[lane_k]),
                    "steps_run": int((~torch.isnan(result.loss_trace[lane_k])).sum()),
                    "final_loss": float(result.final_loss[lane_k]), "seconds": seconds_per_lane,
                    "num_classes": C, **vers, "device": str(device),
                })
            origs.append(_to_uint8(orig))
            recs.append(_to_uint8(rec))
            for k in snaps:
                snaps[k].append(_to_uint8(result.snapshots[k][lane_k]))
        arrays = {"originals": np.stack(origs), "reconstructions": np.stack(recs),
                  "loss_trace": np.stack([result.loss_trace[k].numpy() for k, (c, _, _) in enumerate(lane_info)
                                          if c is cell])}
        arrays.update({f"snap_{k}": np.stack(v) for k, v in snaps.items()})
        out.append({"cell_id": cell.cell_id, "spec": cell.spec(), "records": rows, "arrays": arrays,
                    "meta": {"unit_lanes": len(lanes), "unit_slots": slots, "unit_seconds": result.seconds,
                             "eager_fallback": eager}})
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1).nan_to_num(0.5) * 255).round().to(torch.uint8).numpy()


_SHARED: dict = {}  # in a worker: shared memory with the driver (thread advice, attacks done)


def _worker_init(threads, done, parent: int) -> None:
    _SHARED.update(threads=threads, done=done)
    torch.set_num_threads(threads.value)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A worker whose driver is killed (SIGKILL included) must not live on: an orphan would
    finish its unit for nobody and hold its memory. Linux: ask the kernel for SIGKILL when
    the parent dies; elsewhere workers end when the driver's pipe closes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)


def _run_unit_in_worker(unit: Unit) -> list[dict]:
    threads, done = _SHARED["threads"], _SHARED["done"]

    def report(attacks: float) -> None:  # called about once per round
        with done.get_lock():
            done.value += attacks
        if threads.value != torch.get_num_threads():
            torch.set_num_threads(threads.value)

    return run_unit(unit, progress=report)


class AttackBar:
    """The run's progress bar, in attacks. Progress comes as fractions of attacks per round, whose
    float sums can exceed the total; the bar stops at the total (tqdm would warn)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="attack", disable=quiet or total == 0, file=sys.stderr,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} attacks [{elapsed}<{remaining}]")

    @property
    def n(self) -> float:
        return self.bar.n

    def advance(self, to: float) -> None:
        """Move the bar to ``to`` attacks done (never past the total, never back)."""
        self.bar.update(max(0.0, min(float(self.total), to) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def execute(preset: Preset, cells: list[Cell], *, out: Path, data_root: Path, workers: int, lanes: int,
            device: str, engine: str | None, notices: list[str], datasets: list[str],
            snapshot_steps: tuple[int, ...] = (), quiet: bool = False) -> dict:
    """Run the cells not yet in the store; return a summary."""
    store = Store(out)
    todo = [c for c in cells if not store.done(c.cell_id)]
    skipped = len(cells) - len(todo)
    run_info = {"preset": preset.name, "description": preset.description,
                "success": {"metric": preset.success.metric, "threshold": preset.success.threshold},
                "notices": notices, "datasets": datasets, "data_root": str(data_root),
                "cells": len(cells), "command": " ".join(sys.argv), **versions()}
    atomic_write_json(out / "run.json", run_info)
    classes = {d: class_count(d, data_root) for d in sorted({c.dataset for c in todo})}
    units = [Unit(u, str(data_root), device, engine, lanes, snapshot_steps) for u in plan_units(todo, lanes, classes)]
    total = sum(u.lanes for u in units)
    started = time.perf_counter()
    bar = AttackBar(total, quiet)

    def save(results: list[dict]) -> None:
        for r in results:
            for row in r["records"]:
                row["preset"] = preset.name
                row["success"] = bool(preset.success.success(row))
            store.write_cell(r["cell_id"], r["spec"], r["records"], r["meta"], r["arrays"])

    if min(workers, len(units)) <= 1:
        for u in units:
            before = bar.n
            save(run_unit(u, progress=lambda k: bar.advance(bar.n + k)))
            bar.advance(before + u.lanes)
    else:
        cores = os.cpu_count() or 1
        ctx = get_context("spawn")
        threads = ctx.Value("i", max(1, cores // workers), lock=False)
        done = ctx.Value("d", 0.0)  # attacks done by the workers, fractional
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(threads, done, os.getpid())) as pool:
            futures = {pool.submit(_run_unit_in_worker, u): u for u in units}
            pending, finished = set(futures), 0
            while pending:
                ready, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in ready:
                    save(fut.result())
                    finished += futures[fut].lanes
                bar.advance(max(done.value, finished))
                # Fewer units left than workers: idle workers' cores go to the busy ones.
                if ready and 0 < len(pending) < workers:
                    threads.value = max(threads.value, cores // len(pending))
    bar.close()
    # Compile fallbacks of every stored cell, this invocation's and a resumed run's earlier ones.
    fallbacks = sorted({r for m in store.metas() for r in m.get("eager_fallback", [])})
    if fallbacks:
        atomic_write_json(out / "run.json", {**run_info, "notices": notices + fallbacks})
    return {"cells": len(cells), "skipped": skipped, "ran": len(todo), "units": len(units),
            "seconds": time.perf_counter() - started, "notices": fallbacks}
