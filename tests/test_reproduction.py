"""Tests for bench/reproduction.py on constructed records, NPZ cells and accuracy rows (nothing is trained)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.accuracy import collect_accuracy
from bench.report import collect_records
from bench.reproduction import (
    HOLDS,
    NOT_HOLD,
    NOT_MEASURED,
    PARTLY,
    pareto_front,
    write_reproduction,
)
from bench.store import atomic_write_json
from defenses import make_defense

GRID = [("none", None), ("gaussian", 1e-4), ("gaussian", 1e-3), ("gaussian", 1e-2), ("gaussian", 1e-1),
        ("laplacian", 1e-3), ("laplacian", 1e-2), ("fp16", None), ("bf16", None), ("int8", None),
        ("prune", 10.0), ("prune", 20.0), ("prune", 30.0), ("prune", 90.0), ("prune", 99.0)]  # fmt: skip
CLOSURES = {"mnist": 20, "cifar10": 60, "lfw": 150}
NOTICE = "Skipped datasets not found: svhn."
IMAGES = 8
STEPS = 12


def paper_leaks(dataset: str, defense: str, strength: float | None) -> bool:
    """The paper's picture: what leaks (every image) and what defends (no image)."""
    if defense in ("gaussian", "laplacian"):
        return strength < 1e-2
    if defense == "prune":
        return strength <= 20
    return defense in ("none", "fp16", "bf16")


def make_store(out: Path, *, datasets=("mnist", "cifar10", "lfw"), grid=GRID, leaks=paper_leaks,
               batch_sizes=(1,), snapshots: bool = True, closures=CLOSURES,
               images: int = IMAGES) -> pd.DataFrame:  # fmt: skip
    rng = np.random.default_rng(0)
    run = {"preset": "fake", "success": {"metric": "mse", "threshold": 1e-3}, "notices": [NOTICE],
           "datasets": list(datasets)}  # fmt: skip
    atomic_write_json(out / "run.json", run)
    for dataset in datasets:
        for B in batch_sizes:
            for defense, strength in grid:
                d = make_defense(defense, strength)
                cid = hashlib.sha256(f"{dataset}|{d.label}|{B}".encode()).hexdigest()[:16]
                won = leaks(dataset, defense, strength)
                origs = rng.integers(0, 256, (images, B, 3, 8, 8), dtype=np.uint8)
                noise = 2 if won else 90
                recs = np.clip(origs + rng.normal(0, noise, origs.shape), 0, 255).astype(np.uint8)
                rows = []
                for lane in range(images):
                    for slot in range(B):
                        rows.append({
                            "cell_id": cid, "preset": "fake", "dataset": dataset, "model": "lenet-dlg",
                            "attack": "dlg", "defense": defense, "family": d.family, "parameter": d.parameter,
                            "strength": d.strength, "defense_label": d.label, "batch_size": B, "image": lane,
                            "slot": slot, "seed": 0, "mse": 1e-4 if won else 0.1,
                            "ssim": 0.95 - 0.01 * lane if won else 0.05 + 0.01 * lane, "success": won,
                            "status": "converged" if won else "budget",
                            "closures": closures.get(dataset, 40) * B + lane if won else 300,
                        })  # fmt: skip
                trace = np.geomspace(1.0, 1e-6 if won else 1e-1, STEPS)[None].repeat(images, 0)
                trace[0, STEPS // 2:] = np.nan  # a lane that stopped early
                arrays = {"originals": origs, "reconstructions": recs, "loss_trace": trace}
                if snapshots and defense == "none":
                    for step in (0, 5, 10):
                        arrays[f"snap_{step}"] = np.clip(origs + rng.normal(0, 80 / (1 + step), origs.shape),
                                                         0, 255).astype(np.uint8)  # fmt: skip
                (out / "cells").mkdir(parents=True, exist_ok=True)
                np.savez_compressed(out / "cells" / f"{cid}.npz", **arrays)
                atomic_write_json(out / "cells" / f"{cid}.json", {"spec": {}, "records": rows, "meta": {}})
    return collect_records(out)


def paper_drop(defense: str, strength: float | None) -> float:
    """Accuracy drop (fraction) in the paper's picture; pruning at 99 % costs (plain pruning, no DGC)."""
    if defense in ("gaussian", "laplacian"):
        return 0.05 if strength >= 1e-2 else 0.002
    if defense == "int8":
        return 0.02
    if defense == "prune":
        return 0.03 if strength >= 99 else 0.004
    return 0.0


def make_accuracy(out: Path, *, datasets=("mnist", "cifar10"), grid=GRID, seeds=(0, 1),
                  drop: Callable = paper_drop) -> pd.DataFrame:  # fmt: skip
    for dataset in datasets:
        for defense, strength in grid:
            d = make_defense(defense, strength)
            for seed in seeds:
                jid = hashlib.sha256(f"{dataset}|{d.label}|{seed}".encode()).hexdigest()[:16]
                acc = 0.9 + 0.002 * seed - drop(defense, strength)
                row = {"job_id": jid, "preset": "fake", "dataset": dataset, "model": "convnet", "defense": defense,
                       "family": d.family, "parameter": d.parameter, "strength": d.strength, "defense_label": d.label,
                       "seed": seed, "epochs": 2, "batch_size": 64, "workers": 4, "lr": 0.05, "momentum": 0.9,
                       "weight_decay": 5e-4, "augment": False, "train_limit": None, "image_size": 32,
                       "train_images": 5000, "test_images": 10000, "split": f"{dataset} 5k train subset / 10k test",
                       "test_accuracy": acc, "train_loss": 0.1, "diverged": False, "seconds": 1.0}  # fmt: skip
                atomic_write_json(out / "accuracy" / f"{jid}.json", {"spec": {}, "row": row})
    return collect_accuracy(out)


def verdicts(out: Path) -> dict[str, str]:
    text = (out / "REPRODUCTION.md").read_text()
    table = text.split("## Verdicts")[1].split("##")[0]
    result = {}
    for line in table.splitlines():
        if line.startswith("| ") and ". " in line and "**" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            result[cells[0].split(".")[0]] = cells[1].strip("*")
    return result


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("paper")
    records = make_store(out, batch_sizes=(1, 2))
    accuracy = make_accuracy(out)
    written = write_reproduction(out, records, accuracy, json.loads((out / "run.json").read_text()))
    return out, written


def test_paper_picture_gives_the_expected_verdicts(paper: tuple[Path, list[Path]]) -> None:
    out, _ = paper
    assert verdicts(out) == {"1": HOLDS, "2": HOLDS, "3": HOLDS, "4a": HOLDS, "4b": HOLDS, "5": HOLDS,
                             "6": PARTLY, "7a": HOLDS, "7b": HOLDS}  # fmt: skip
    text = (out / "REPRODUCTION.md").read_text()
    assert "holds on mnist, cifar10, lfw" in text
    assert "prune 99%: accuracy" in text and "Keeps accuracy at every measured sparsity up to 90 %." in text
    assert "Weakest defending strength: gaussian: gaussian var=1e-2; laplacian: laplacian var=1e-2." in text
    assert "momentum correction" in text  # the DGC caveat is stated


def test_report_states_notices_thresholds_and_intervals(paper: tuple[Path, list[Path]]) -> None:
    out, _ = paper
    lines = (out / "REPRODUCTION.md").read_text().splitlines()
    assert lines[0].startswith("# ") and "`fake`" in lines[0]
    assert lines[2] == f"> **Note:** {NOTICE}"
    assert any("smallest victim batch size" in ln for ln in lines[:12])
    text = "\n".join(lines)
    for needle in ("Wilson", "Student-t", "upper bound of the 95 % Wilson interval", "< 0.5", "≥ 1 percentage",
                   "8/8 (100 %) [68, 100]", "0/8 (0 %) [0, 32]", "n = 8", "t over seeds, 2 seed(s)"):
        assert needle in text, needle


def test_tables_have_rule_rows_and_booktabs(paper: tuple[Path, list[Path]]) -> None:
    out, _ = paper
    csv = pd.read_csv(out / "tables" / "paper_table.csv")
    assert len(csv) == 3 * len(GRID)  # mnist, cifar10, lfw; B = 1 only
    assert list(dict.fromkeys(csv["dataset"])) == ["mnist", "cifar10", "lfw"]
    mnist = csv[csv["dataset"] == "mnist"]
    assert list(mnist["defense_label"]) == [make_defense(n, s).label for n, s in GRID]
    assert csv["defended_rule"].nunique() == 1 and "Wilson" in csv["defended_rule"].iloc[0]
    assert csv.loc[csv["defense_label"] == "int8", "defended"].all()
    assert csv[(csv["dataset"] == "lfw")]["accuracy"].isna().all()  # lfw has no train split
    tex = (out / "tables" / "paper_table.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "prune 99\\%" in tex
    md = (out / "tables" / "paper_table.md").read_text()
    assert "Wilson" in md.splitlines()[0]
    weakest = pd.read_csv(out / "tables" / "weakest_defending.csv")
    row = weakest[(weakest["dataset"] == "mnist") & (weakest["defense"] == "prune")].iloc[0]
    assert row["weakest_defending"] == "prune 30%" and row["strength"] == 30 and row["stronger_all_defend"]
    fp16 = weakest[(weakest["dataset"] == "mnist") & (weakest["defense"] == "fp16")].iloc[0]
    assert fp16["weakest_defending"] == "none defends"


def test_figures_are_written(paper: tuple[Path, list[Path]]) -> None:
    out, written = paper
    for stem in ("iterations", "family_noise", "family_precision", "family_sparsity", "tradeoff", "batch_size"):
        png = (out / "figures" / f"{stem}.png").read_bytes()
        pdf = (out / "figures" / f"{stem}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5_000, stem
        assert pdf.startswith(b"%PDF") and b"CreationDate" not in pdf, stem
        assert out / "figures" / f"{stem}.png" in written
    assert not (out / "figures" / "family_none.png").exists()
    assert "![Accuracy drop vs leakage](figures/tradeoff.png)" in (out / "REPRODUCTION.md").read_text()


def test_output_is_deterministic(paper: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, written = paper
    before = {p: p.read_bytes() for p in written}
    again = write_reproduction(out, collect_records(out), collect_accuracy(out),
                               json.loads((out / "run.json").read_text()))  # fmt: skip
    assert again == written
    assert {p: p.read_bytes() for p in again} == before
    assert not list(out.rglob("*.tmp"))


def test_claims_that_do_not_hold(tmp_path: Path) -> None:
    def leaks(dataset: str, defense: str, strength: float | None) -> bool:
        return defense in ("none", "gaussian", "laplacian", "bf16", "prune")  # noise and pruning never defend

    grid = [("none", None), ("gaussian", 1e-3), ("gaussian", 1e-1), ("fp16", None), ("bf16", None),
            ("int8", None), ("prune", 10.0), ("prune", 50.0), ("prune", 99.0)]  # fmt: skip
    records = make_store(tmp_path, grid=grid, leaks=leaks, closures={"mnist": 200, "cifar10": 60, "lfw": 10})
    accuracy = make_accuracy(tmp_path, grid=grid, drop=lambda d, s: 0.0)
    write_reproduction(tmp_path, records, accuracy, {"preset": "fake", "datasets": ["mnist", "cifar10", "lfw"]})
    v = verdicts(tmp_path)
    assert v["1"] == NOT_HOLD and v["2"] == NOT_HOLD and v["4b"] == NOT_HOLD and v["5"] == NOT_HOLD
    assert v["3"] == PARTLY  # fp16 defends here, bf16 does not
    assert v["6"] == HOLDS and v["4a"] == HOLDS
    assert v["7a"] == PARTLY  # same success everywhere (ties count), but MNIST is the slowest
    assert v["7b"] == NOT_HOLD


def test_missing_cells_are_not_measured(tmp_path: Path) -> None:
    grid = [("none", None), ("gaussian", 1e-1), ("fp16", None)]  # no setting below 1e-2, no int8, no pruning
    records = make_store(tmp_path, datasets=("digits", "cifar10"), grid=grid, snapshots=False,
                         leaks=lambda ds, d, s: ds == "digits" and d != "gaussian")  # fmt: skip
    write_reproduction(tmp_path, records, None, {"preset": "fake", "notices": []})
    v = verdicts(tmp_path)
    assert set(v.values()) == {NOT_MEASURED, HOLDS}
    assert v["3"] == HOLDS  # fp16 leaks on digits; cifar10 has no leaking baseline and is left out
    for key in ("1", "2", "4a", "4b", "5", "6", "7a", "7b"):
        assert v[key] == NOT_MEASURED, key
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert "needs noise settings on both sides of 1e-2" in text
    assert "the undefended attack itself does not leak here" in text
    assert "no accuracy results" in text.lower()
    assert "mnist has no undefended cell" in text and "no undefended cell on lfw" in text
    assert "No iteration figure" in text
    assert not (tmp_path / "figures" / "iterations.png").exists()
    assert not (tmp_path / "figures" / "tradeoff.png").exists()
    assert not (tmp_path / "figures" / "batch_size.png").exists()
    assert (tmp_path / "figures" / "family_noise.png").is_file()


def test_too_few_images_is_inconclusive_not_evidence(tmp_path: Path) -> None:
    grid = [("none", None), ("gaussian", 1e-3), ("gaussian", 1e-1), ("fp16", None), ("int8", None)]
    records = make_store(tmp_path, datasets=("mnist", "lfw"), grid=grid, images=2, snapshots=False,
                         leaks=lambda ds, d, s: False)  # fmt: skip
    write_reproduction(tmp_path, records, None, {})
    assert set(verdicts(tmp_path).values()) == {NOT_MEASURED}
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert "0/2 (0 %) [0, 66]: inconclusive), so no defense can be shown to matter" in text
    assert "no undefended attack succeeded on any dataset" in text
    table = pd.read_csv(tmp_path / "tables" / "paper_table.csv")
    assert set(table["outcome"]) == {"inconclusive"} and not table["defended"].any()
    assert "inconclusive" in (tmp_path / "tables" / "paper_table.md").read_text()


def test_identical_attacks_from_two_presets_count_once(tmp_path: Path) -> None:
    make_store(tmp_path, datasets=("mnist",), grid=[("none", None), ("int8", None)], snapshots=False)
    cell = next(p for p in (tmp_path / "cells").glob("*.json") if '"none"' in p.read_text())
    copy = tmp_path / "cells" / ("f" * 16 + ".json")
    copy.write_text(cell.read_text().replace(cell.stem, "f" * 16))
    (tmp_path / "cells" / ("f" * 16 + ".npz")).write_bytes(cell.with_suffix(".npz").read_bytes())
    records = collect_records(tmp_path)
    assert len(records) == 3 * IMAGES
    write_reproduction(tmp_path, records, None, {})
    table = pd.read_csv(tmp_path / "tables" / "paper_table.csv")
    assert list(table["n"]) == [IMAGES, IMAGES]
    assert f"Dropped {IMAGES} records that repeat an identical attack" in (tmp_path / "REPRODUCTION.md").read_text()


def test_pareto_front() -> None:
    x = [0.0, 1.0, 2.0, 0.5, 3.0, float("nan")]
    y = [0.9, 0.2, 0.1, 0.95, 0.3, 0.0]
    assert pareto_front(x, y) == [0, 1, 2]
    assert pareto_front([], []) == []


# -- the committed paper results ---------------------------------------------------------------------------

PAPER = Path(__file__).resolve().parents[1] / "results" / "paper"
PAPER_INPUTS = ("records.csv", "accuracy", "run.json", "figure_arrays.npz")


def test_committed_paper_report_regenerates_identically_from_its_records(tmp_path):
    """results/paper keeps the run's records (not the cells store): `bench report` on them alone
    must rebuild every committed table, summary and REPRODUCTION.md byte for byte, and the same figures."""
    import shutil

    from bench.cli import main

    for name in PAPER_INPUTS:
        src = PAPER / name
        assert src.exists(), f"{src} is not committed"
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    assert main(["report", "--out", str(tmp_path)]) == 0
    committed = {p.relative_to(PAPER) for p in PAPER.rglob("*") if p.is_file()}
    committed = {p for p in committed if p.parts[0] != "cells"}  # a local store, never committed
    produced = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert produced == committed
    for rel in sorted(committed):
        if rel.parts[0] in ("figures", "accuracy") or rel.name == "figure_arrays.npz":
            continue  # figures: same files (checked above); their bytes depend on the matplotlib build
        assert (tmp_path / rel).read_bytes() == (PAPER / rel).read_bytes(), f"{rel} differs from the committed one"
