"""``python -m bench run|report|list|perf``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import UserError

KINDS = ("datasets", "models", "attacks", "defenses", "metrics", "presets")


def _default_out(preset: str) -> Path:
    return Path("results") / Path(preset).stem


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from bench.accuracy import JOB_ONLY_KEYS, accuracy_jobs, pending_jobs, resolve_training_datasets, run_accuracy
    from bench.config import load_preset, parse_only, select
    from bench.data import resolve_data_root
    from bench.runner import execute, resolve_datasets, resolve_lanes, resolve_workers

    preset = load_preset(args.preset)
    only = parse_only(args.only)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    workers, lanes = resolve_workers(args.workers, device), resolve_lanes(args.lanes, device)
    root = resolve_data_root(args.data_root)
    wanted = [d for d in preset.datasets if "dataset" not in only or d in only["dataset"]]
    if not wanted:
        raise UserError(f"--only dataset={','.join(sorted(only['dataset']))}: not in preset {preset.name!r} "
                        f"(its datasets: {', '.join(preset.datasets)})")
    datasets, notices = resolve_datasets(preset, wanted, root, args.download)
    train_sets, train_notices = resolve_training_datasets(preset, root)  # ([], []) without [training]
    notices += train_notices
    for n in notices:
        print(f"note: {n}", file=sys.stderr)
    cells = select(preset.cells(datasets), {k: v for k, v in only.items() if k != "dataset"})
    if not cells:
        raise UserError("--only selects no cell of this preset; see `python -m bench list presets`")
    out = Path(args.out) if args.out else _default_out(args.preset)
    summary = execute(preset, cells, out=out, data_root=root, workers=workers, lanes=lanes,
                      device=device, engine=args.engine, notices=notices, datasets=datasets,
                      snapshot_steps=preset.snapshot_steps, quiet=args.quiet)
    for n in summary["notices"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"{summary['ran']} cells run, {summary['skipped']} already stored, "
          f"{summary['seconds']:.0f} s; results in {out}")
    jobs = select(accuracy_jobs(preset, train_sets), {k: v for k, v in only.items() if k in JOB_ONLY_KEYS})
    if jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(pending_jobs(jobs, out)), unit="job", disable=args.quiet, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total} training jobs [{elapsed}<{remaining}]")
        acc = run_accuracy(jobs, out=out, data_root=root, device=device, progress=lambda x: bar.update(x - bar.n))
        bar.close()
        print(f"{acc['ran']} accuracy jobs run, {acc['skipped']} already stored, {acc['seconds']:.0f} s")
    if not args.no_report:
        return cmd_report(argparse.Namespace(out=str(out)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.accuracy import collect_accuracy
    from bench.report import load_records, read_run_info, write_report
    from bench.reproduction import write_reproduction

    out = Path(args.out) if args.out else None
    if out is None:
        raise UserError("report: --out DIR is required (the folder a run wrote)")
    if not out.is_dir():
        raise UserError(f"report: {out} does not exist; run `python -m bench run --out {out}` first")
    paths = write_report(out)
    paths += write_reproduction(out, load_records(out), collect_accuracy(out), read_run_info(out))
    for p in paths:
        print(p)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from attacks import ATTACKS
    from bench.config import PRESET_DIR, load_preset
    from bench.data import DATASETS
    from bench.metrics import METRICS
    from bench.models import MODELS
    from defenses import DEFENSES

    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        print(f"{kind}:")
        if kind == "datasets":
            for n in DATASETS.names():
                s = DATASETS.get(n)
                print(f"  {n:<12} {'embedded' if s.embedded else 'card'}; splits {', '.join(s.splits)}")
        elif kind == "models":
            for n in MODELS.names():
                print(f"  {n:<12} {MODELS.get(n).description}")
        elif kind == "attacks":
            for n in ATTACKS.names():
                print(f"  {n:<12} {ATTACKS.get(n).description}")
        elif kind == "defenses":
            for n in DEFENSES.names():
                k = DEFENSES.get(n)
                grid = ", ".join(f"{v:g}" for v in k.default_grid)
                print(f"  {n:<12} family {k.family}; {k.parameter or 'no parameter'}"
                      + (f"; paper grid {grid}" if grid else ""))
        elif kind == "metrics":
            for n in METRICS.names():
                m = METRICS.get(n)
                print(f"  {n:<12} {m.leakage_direction} = more leakage; {m.description}")
        elif kind == "presets":
            for p in sorted(PRESET_DIR.glob("*.toml")):
                pr = load_preset(p.stem)
                print(f"  {p.stem:<12} {len(pr.cells())} cells x {pr.images} images; {pr.description}")
    return 0


def cmd_perf(args: argparse.Namespace) -> int:
    from bench.perf import run_perf

    return run_perf(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a preset's matrix (resumable), then write the report")
    r.add_argument("--preset", default="default", help="preset name (bench/presets) or path to a .toml")
    r.add_argument("--data-root", help="data folder (default: $DLG_BENCH_DATA, else ~/.cache/dlg-bench/data)")
    r.add_argument("--out", help="results folder (default: results/<preset>)")
    r.add_argument("--workers", default="auto",
                   help="worker processes (default auto: one per CPU core, one on CUDA)")
    r.add_argument("--lanes", default="auto",
                   help="attacks computed together in a worker (default auto: 12 on the CPU, 256 on CUDA; on the "
                        "CPU fewer where their weights and targets exceed 48 MB); a work unit queues up to 4x as many")
    r.add_argument("--only", action="append", metavar="KEY=V1,V2",
                   help="run only matching cells; repeatable, e.g. --only defense=none --only dataset=mnist,lfw")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--engine", choices=("compiled", "eager", "serial"),
                   help="override the attack engine (results are the same up to float rounding)")
    r.add_argument("--download", action="store_true", help="download missing datasets (torchvision/sklearn)")
    r.add_argument("--no-report", action="store_true", help="skip writing the report")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="(re)write records.csv, tables and figures from a results folder")
    rep.add_argument("--out", default="results/default")
    rep.set_defaults(func=cmd_report)
    ls = sub.add_parser("list", help="list registered datasets, models, attacks, defenses, metrics, presets")
    ls.add_argument("kind", nargs="?", choices=KINDS)
    ls.set_defaults(func=cmd_list)
    pf = sub.add_parser("perf", help="serial reference vs batched engine on the same real images")
    pf.add_argument("--data-root")
    pf.add_argument("--dataset", default="cifar10")
    pf.add_argument("--attacks", type=int, default=128, help="attacks in the batched run (default 128)")
    pf.add_argument("--lanes", default="auto",
                    help="attacks a worker computes together, the others queue for a slot (default auto, as bench "
                         "run: 12 on the CPU, 256 on CUDA)")
    pf.add_argument("--workers", default="auto",
                    help="worker processes for the batched engine, as in bench run (default auto: one per CPU "
                         "core, at most one per attack; one on CUDA)")
    pf.add_argument("--serial-attacks", type=int, default=4, help="attacks timed one at a time")
    pf.add_argument("--steps", type=int, default=300)
    pf.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both engines run")
    pf.add_argument("--json", help="also write the figures to this JSON file")
    pf.set_defaults(func=cmd_perf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished cells are stored, rerun the same command to resume", file=sys.stderr)
        return 130
