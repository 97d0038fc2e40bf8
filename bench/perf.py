"""``python -m bench perf``: the serial reference vs the batched engine, same images, one process.

Both engines attack real images of one dataset with the paper's DLG (lenet-dlg, 300
L-BFGS steps, no defense), with lanes built exactly as :func:`bench.runner.run_unit`
builds them (seed 0): the serial reference (``engine="serial"``, the paper's code,
one attack at a time) on the first ``--serial-attacks`` images, the batched engine
(``engine="compiled"``, ``--lanes`` attacks at a time, the rest queued for a slot) on
``--attacks`` images that start with those same images, so the shared images get the
same weights, targets and dummy initialisation.

Printed: attacks per minute for each engine (the batched figure with and without its
one-off compilation, which a short warm-up run measures), their ratio, ms per
lane-closure (wall time / closure evaluations), the batched engine's rounds (one closure call
for all running lanes; lane after lane, each C call's most rounds of one lane) and running lanes
per round, peak RSS, and the per-image agreement
on the shared images (success at MSE < 1e-3 in both or neither, MSE ratio). Where
``torch.compile`` failed and the batched engine ran eagerly, a ``note:`` line says so. The last
line is ``speedup: N.Nx``, attacks per minute batched (compilation included) over
serial.

``--workers`` and ``--lanes`` default to ``auto``, as in ``bench run`` (on the CPU one
single-threaded worker process per core with 12 slots each; on CUDA this one process with
256): N worker processes with cores / N threads each, the attacks dealt to them in turn,
each with ``--lanes`` slots; they start their warm-up together and their timed run
together, and the batched figures are the machine's (wall time of the slowest worker,
closures and rounds of all). ``--workers 1`` runs the batched engine in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import resource
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from attacks import ATTACKS, AttackBatch, Lane
from attacks.compiling import eager_calls, eager_since
from attacks.dlg import victim_gradient
from bench.data import load_images, resolve_data_root
from bench.errors import UserError
from bench.metrics import mse
from bench.models import build_model
from bench.runner import derive_seed, resolve_lanes, resolve_workers
from defenses import make_defense

MODEL = "lenet-dlg"
SEED = 0
SUCCESS_MSE = 1e-3


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"perf: --{name} must be a positive integer, got {value!r}")
    return value


def build_batch(dataset: str, count: int, root: Path, device: str = "cpu",
                only: list[int] | None = None) -> tuple[AttackBatch, torch.Tensor, list[int]]:
    """``count`` real images of ``dataset`` as single-image DLG lanes, built as ``run_unit`` builds them
    (cell seed 0, image_seed 0, no defense); ``only`` builds just those of the ``count`` lanes. Returns
    the batch, the lanes' images and their dataset indices."""
    data = load_images(dataset, count=count, seed=SEED, size=32, channels=3, root=root)
    C = data.num_classes
    arch = build_model(MODEL, num_classes=C, channels=3, size=32)
    defense = make_defense("none")
    picks = list(range(count)) if only is None else only
    lanes = []
    for i in picks:
        lane_seed = derive_seed(SEED, dataset, MODEL, data.indices[i])
        model = build_model(MODEL, num_classes=C, channels=3, size=32,
                            generator=torch.Generator().manual_seed(lane_seed))
        params = {k: v.detach() for k, v in model.named_parameters()}
        clean = victim_gradient(arch, params, data.images[i:i + 1], data.labels[i:i + 1], C)
        gen = torch.Generator().manual_seed(derive_seed(lane_seed, "none", None))
        shared = dict(zip(clean, defense(list(clean.values()), generator=gen)))
        lanes.append(Lane(params=params, target_grads=shared, seed=derive_seed(lane_seed, "dummy")))
    batch = AttackBatch(model=arch, image_shape=(3, 32, 32), num_classes=C, batch_size=1, lanes=lanes,
                        device=torch.device(device))
    return batch, data.images[picks], [data.indices[i] for i in picks]


def _subset(batch: AttackBatch, k: int) -> AttackBatch:
    return AttackBatch(model=batch.model, image_shape=batch.image_shape, num_classes=batch.num_classes,
                       batch_size=batch.batch_size, lanes=batch.lanes[:k], device=batch.device)


def _mses(result, images: torch.Tensor) -> list[float]:
    return [mse(images[i].numpy(), result.reconstructions[i, 0].numpy()) for i in range(len(result.status))]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def _timed_batched(batch: AttackBatch, images: torch.Tensor, steps: int,
                   barrier: object | None = None) -> dict:
    """A 1-step warm-up (compiles everything this batch size needs; smaller bucket sizes, for
    lanes stopping early, compile inside the timed run), then the timed run. With a ``barrier``
    (workers), both start when every worker is ready."""
    before = eager_calls()
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    ATTACKS.get("dlg").make(steps=1, engine="compiled")(batch)
    warmup = time.perf_counter() - t0
    if barrier is not None:
        barrier.wait()
    res = ATTACKS.get("dlg").make(steps=steps, engine="compiled")(batch)
    return {"seconds": res.seconds, "warmup": warmup, "closures": int(res.closures.sum()), "rounds": res.rounds,
            "mses": _mses(res, images), "status": list(res.status),
            "eager_fallback": eager_since(before)}


def _worker(dataset: str, count: int, root: Path, device: str, picks: list[int], slots: int, steps: int,
            threads: int, barrier: object, results: object) -> None:
    """One ``--workers`` process: its share (``picks``) of the ``count`` lanes, built as the parent builds them."""
    try:
        torch.set_num_threads(threads)
        batch, images, _ = build_batch(dataset, count, root, device, only=picks)
        out = _timed_batched(dataclasses.replace(batch, slots=slots), images, steps, barrier)
        results.put((picks, {**out, "rss": _peak_rss_mib()}))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as one line
        barrier.abort()
        results.put((None, f"{type(exc).__name__}: {exc}"))


def _batched_in_workers(workers: int, dataset: str, count: int, root: Path, device: str, slots: int,
                        steps: int) -> dict:
    """The batched engine in ``workers`` processes; the machine's figures, per-lane outcomes in lane order."""
    ctx = get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(dataset, count, root, device, list(range(w, count, workers)), slots, steps,
                               threads, barrier, results))
             for w in range(workers)]
    for p in procs:
        p.start()
    parts: list = []
    try:
        while len(parts) < workers:
            try:
                picks, out = results.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(f"perf: a batched worker died (exit code {dead[0]}); "
                                    "rerun with --workers 1 to run the batched engine in this process") from None
                continue
            if picks is None:
                raise UserError(f"perf: a batched worker failed ({out}); "
                                "rerun with --workers 1 to see it in this process")
            parts.append((picks, out))
    finally:
        for p in procs:
            if p.is_alive() and len(parts) < workers:
                p.kill()
            p.join()
    mses, status = [0.0] * count, [""] * count
    for picks, out in parts:
        for j, i in enumerate(picks):
            mses[i], status[i] = out["mses"][j], out["status"][j]
    return {"seconds": max(o["seconds"] for _, o in parts), "warmup": max(o["warmup"] for _, o in parts),
            "closures": sum(o["closures"] for _, o in parts), "rounds": sum(o["rounds"] for _, o in parts),
            "mses": mses, "status": status, "worker_rss": max(o["rss"] for _, o in parts), "threads": threads,
            "eager_fallback": sorted({r for _, o in parts for r in o["eager_fallback"]})}


def run_perf(args: argparse.Namespace) -> int:
    attacks = _positive_int("attacks", args.attacks)
    serial_n = _positive_int("serial-attacks", args.serial_attacks)
    steps = _positive_int("steps", args.steps)
    device = getattr(args, "device", "cpu")
    lanes = resolve_lanes(getattr(args, "lanes", "auto"), device, flag="perf: --lanes")
    asked = getattr(args, "workers", "auto")
    workers = resolve_workers(asked, device, flag="perf: --workers")
    if asked == "auto":  # never more workers than attacks
        workers = min(workers, attacks)
    if workers > attacks:
        raise UserError(f"perf: --workers ({workers}) must not exceed --attacks ({attacks}): each worker needs "
                        "attacks of its own")
    if serial_n > attacks:
        raise UserError(f"perf: --serial-attacks ({serial_n}) must not exceed --attacks ({attacks}): "
                        "the serial images are the first of the batched ones")
    out = Path(args.json) if getattr(args, "json", None) else None
    if out is not None and not out.parent.is_dir():
        raise UserError(f"perf: --json {out}: folder {out.parent} does not exist; create it or pick another path")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("perf: --device cuda: no CUDA device is available; use --device cpu")
    root = resolve_data_root(args.data_root)
    batch, images, indices = build_batch(args.dataset, attacks, root, device)
    batch = dataclasses.replace(batch, slots=lanes)
    slots = min(lanes, -(-attacks // workers))  # per worker
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"perf: {args.dataset} images {indices[:serial_n]}{'...' if attacks > serial_n else ''}, {MODEL}, "
          f"DLG {steps} steps, no defense; torch {torch.__version__}, {threads} threads, {where}", flush=True)

    # Serial reference: the paper's code, one attack at a time.
    serial = ATTACKS.get("dlg").make(steps=steps, engine="serial")
    res_s = serial(_subset(batch, serial_n))
    closures_s = int(res_s.closures.sum())
    print(f"serial:  {serial_n} attacks in {res_s.seconds:.1f} s", flush=True)

    # Batched engine, in this process or (--workers) as bench run runs it.
    if workers == 1:
        res_b = _timed_batched(batch, images, steps)
        where_b = f"{slots} at a time"
    else:
        res_b = _batched_in_workers(workers, args.dataset, attacks, root, device, lanes, steps)
        where_b = f"in {workers} worker processes of {res_b['threads']} thread(s), {slots} at a time in each"
    closures_b, warmup = res_b["closures"], res_b["warmup"]
    with_compile = res_b["seconds"] + warmup
    print(f"batched: {attacks} attacks, {where_b}, in {res_b['seconds']:.1f} s "
          f"(+ {warmup:.1f} s warm-up with compilation)", flush=True)
    for n in res_b["eager_fallback"]:  # the batched figures are then not the compiled engine's
        print(f"note: {n}", flush=True)
    # Fewer than the slots once no attack waits: the last ones finish in ever smaller rounds (the drain).
    lanes_per_round = closures_b / res_b["rounds"]

    per_min_s = 60 * serial_n / res_s.seconds
    per_min_b = 60 * attacks / with_compile
    per_min_b_warm = 60 * attacks / res_b["seconds"]
    ms_s = 1000 * res_s.seconds / closures_s
    ms_b = 1000 * res_b["seconds"] / closures_b
    rss_mib = _peak_rss_mib()

    print(f"attacks/min serial:   {per_min_s:10.1f}")
    print(f"attacks/min batched:  {per_min_b:10.1f}  (compilation included; {per_min_b_warm:.1f} without)")
    print(f"ratio batched/serial: {per_min_b / per_min_s:10.1f}x "
          f"(without compilation {per_min_b_warm / per_min_s:.1f}x)")
    print(f"ms per lane-closure:  serial {ms_s:.3f}, batched {ms_b:.3f} ({closures_s} and {closures_b} closures)")
    print(f"batched rounds:       {res_b['rounds']}, {lanes_per_round:.1f} running lanes per round on average "
          f"({slots} slots{' per worker' if workers > 1 else ''})")
    if workers > 1:
        print(f"peak RSS:             {rss_mib:.0f} MiB (this process), {res_b['worker_rss']:.0f} MiB "
              f"(the largest worker)")
    else:
        print(f"peak RSS:             {rss_mib:.0f} MiB")
    if device == "cuda":
        print(f"peak GPU memory:      {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")

    # Agreement on the shared images. L-BFGS without line search is chaotic (float rounding
    # differences grow to O(1) within ~100 iterations), so iterates differ; outcomes should not.
    mse_s, mse_b = _mses(res_s, images), res_b["mses"][:serial_n]
    rows, agree, within2 = [], 0, 0
    print("image  serial MSE   batched MSE  success s/b  MSE ratio")
    for i in range(serial_n):
        ok_s, ok_b = mse_s[i] < SUCCESS_MSE, mse_b[i] < SUCCESS_MSE
        ratio = mse_b[i] / mse_s[i] if mse_s[i] > 0 else float("inf")
        agree += ok_s == ok_b
        within2 += ok_s and ok_b and 0.5 <= ratio <= 2
        rows.append({"image": indices[i], "mse_serial": mse_s[i], "mse_batched": mse_b[i], "success_serial": ok_s,
                     "success_batched": ok_b, "mse_ratio": ratio, "status_serial": res_s.status[i],
                     "status_batched": res_b["status"][i]})
        flags = f"{'yes' if ok_s else 'no':>3}/{'yes' if ok_b else 'no':<3}"
        print(f"{indices[i]:5d}  {mse_s[i]:.3e}    {mse_b[i]:.3e}    {flags}     {ratio:.2f}")
    both = sum(r["success_serial"] and r["success_batched"] for r in rows)
    print(f"agreement: success/failure agrees on {agree}/{serial_n} images; MSE within 2x on {within2}/{both} "
          f"images where both succeed")
    speedup = per_min_b / per_min_s
    if out is not None:
        figures = {
            "dataset": args.dataset, "device": device, "model": MODEL, "steps": steps, "threads": threads,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "serial_attacks": serial_n, "batched_attacks": attacks, "lanes": lanes,
            "workers": workers, "serial_seconds": res_s.seconds, "batched_seconds": res_b["seconds"],
            "warmup_seconds": warmup,
            "attacks_per_min_serial": per_min_s, "attacks_per_min_batched": per_min_b,
            "attacks_per_min_batched_without_compile": per_min_b_warm, "speedup": speedup,
            "speedup_without_compile": per_min_b_warm / per_min_s, "ms_per_lane_closure_serial": ms_s,
            "ms_per_lane_closure_batched": ms_b, "closures_serial": closures_s, "closures_batched": closures_b,
            "rounds_batched": res_b["rounds"], "lanes_per_round": lanes_per_round,
            "peak_rss_mib": rss_mib, "peak_rss_mib_worker": res_b.get("worker_rss"), "agreement": rows,
            "success_agree": agree, "mse_within_2x": within2, "eager_fallback": res_b["eager_fallback"],
        }
        out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"speedup: {speedup:.1f}x")
    return 0
