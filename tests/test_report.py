"""Tests for bench/report.py on fake results stores (no attack is run)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.errors import UserError
from bench.metrics import psnr, ssim
from bench.report import (
    COLUMNS,
    collect_records,
    format_interval,
    format_success,
    t_interval,
    wilson_interval,
    write_report,
)
from defenses import make_defense

NOTICE = "No card dataset found; ran on embedded datasets digits, lfw-faces"
THRESHOLD = 1e-3
ALL_DEFENSES = [
    ("none", None),
    ("gaussian", 1e-4), ("gaussian", 1e-3), ("gaussian", 1e-2), ("gaussian", 1e-1),
    ("laplacian", 1e-3), ("laplacian", 1e-1),
    ("fp16", None), ("bf16", None), ("int8", None),
    ("prune", 10), ("prune", 50), ("prune", 90),
]  # fmt: skip


def _noise_level(defense: str, strength: float | None) -> float:
    """Plausible reconstruction error (pixel std) left by a defense."""
    if defense in ("gaussian", "laplacian"):
        return min(0.45, 2 * math.sqrt(strength))
    if defense == "prune":
        return 0.005 + 0.4 * (strength / 100) ** 2
    return {"none": 0.005, "fp16": 0.006, "bf16": 0.01, "int8": 0.03}[defense]


def _victims(dataset: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random float images [n, 3, size, size]; 'digits' looks grayscale."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 4, size=(3, 2))
        ph = rng.uniform(0, 2 * np.pi, size=(3, 1, 1))
        img = 0.5 + 0.4 * np.sin(2 * np.pi * (f[:, :1, None] * xx + f[:, 1:, None] * yy) + ph)
        out.append(np.repeat(img[:1], 3, axis=0) if dataset == "digits" else img)
    return np.stack(out)


def _row(cell_id: str, dataset: str, defense: str, strength: float | None, *, image: int,
         slot: int, seed: int, batch_size: int, orig: np.ndarray, rec: np.ndarray,
         status: str) -> dict:  # fmt: skip
    d = make_defense(defense, strength)
    err = float(np.mean((orig - rec) ** 2))
    return {
        "cell_id": cell_id, "preset": "fake", "dataset": dataset,
        "dataset_origin": f"fake {dataset}", "model": "lenet-dlg", "attack": "dlg",
        "engine": "eager", "defense": defense, "family": d.family, "parameter": d.parameter,
        "strength": d.strength, "defense_label": d.label, "batch_size": batch_size,
        "image": image, "slot": slot, "seed": seed, "mse": err, "psnr": psnr(orig, rec),
        "ssim": ssim(orig, rec), "label_acc": 1.0, "success": err < THRESHOLD,
        "status": status, "closures": 300, "steps_run": 300, "final_loss": err,
        "seconds": 1.5, "torch": "2.0", "torchvision": "0.15", "python": "3.11",
        "git_rev": "abc1234", "device": "cpu",
    }  # fmt: skip


def make_fake_store(out: Path, *, datasets: Sequence[str],
                    defenses: Sequence[tuple[str, float | None]], images: int, seed: int,
                    batch_size: int = 1, notices: Sequence[str] = (NOTICE,),
                    size: int = 16) -> None:  # fmt: skip
    """Write a plausible store: run.json plus one JSON + NPZ per (dataset, defense) cell."""
    rng = np.random.default_rng(seed)
    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    run = {"preset": "fake", "success": {"metric": "mse", "threshold": THRESHOLD},
           "notices": list(notices), "datasets": list(datasets), "started": "2024-01-01T00:00:00"}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run))
    for dataset in datasets:
        victims = _victims(dataset, images * batch_size, size, rng)
        for defense, strength in defenses:
            cell_id = hashlib.sha256(f"{dataset}|{defense}|{strength}|{seed}|{batch_size}".encode()).hexdigest()[:16]
            level = _noise_level(defense, strength)
            rows, origs, recs = [], [], []
            for lane in range(images):
                orig = victims[lane * batch_size:(lane + 1) * batch_size]
                sigma = level * np.exp(rng.normal(0, 0.4))
                diverged = level > 0.3 and rng.random() < 0.4
                rec = np.full_like(orig, 0.5) if diverged else np.clip(orig + rng.normal(0, sigma, orig.shape), 0, 1)
                for slot in range(batch_size):
                    rows.append(_row(cell_id, dataset, defense, strength, image=100 + lane * batch_size + slot,
                                     slot=slot, seed=seed, batch_size=batch_size, orig=orig[slot],
                                     rec=rec[slot], status="diverged" if diverged else "converged"))  # fmt: skip
                origs.append(np.round(orig * 255).astype(np.uint8))
                recs.append(np.round(rec * 255).astype(np.uint8))
            spec = {"dataset": dataset, "defense": defense, "strength": strength, "seed": seed}
            np.savez_compressed(cells / f"{cell_id}.npz", originals=np.stack(origs), reconstructions=np.stack(recs))
            (cells / f"{cell_id}.json").write_text(json.dumps({"spec": spec, "records": rows, "meta": {}}))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store")
    shuffled = [ALL_DEFENSES[i] for i in (12, 9, 3, 0, 5, 8, 7, 1, 10, 2, 4, 6, 11)]
    make_fake_store(out, datasets=["lfw-faces", "digits"], defenses=shuffled, images=4, seed=0)
    write_report(out)
    return out


def test_records_csv_one_row_per_record_with_documented_columns(report: Path) -> None:
    df = pd.read_csv(report / "records.csv")
    assert len(df) == 2 * len(ALL_DEFENSES) * 4
    assert tuple(df.columns[: len(COLUMNS)]) == COLUMNS
    assert list(df["cell_id"]) == sorted(df["cell_id"])  # cells sorted, rows in stored order
    assert set(df["status"]) <= {"converged", "diverged"}


def test_batched_store_keeps_lane_major_order(tmp_path: Path) -> None:
    make_fake_store(tmp_path, datasets=["digits"], defenses=[("none", None)], images=2, seed=1, batch_size=3)
    df = collect_records(tmp_path)
    assert list(df["slot"]) == [0, 1, 2, 0, 1, 2]
    assert list(df["image"]) == [100, 101, 102, 103, 104, 105]


def test_wilson_interval_hand_computed() -> None:
    lo, hi = wilson_interval(7, 8)
    assert lo == pytest.approx(0.5291, abs=5e-4)
    assert hi == pytest.approx(0.9776, abs=5e-4)
    assert wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(5, 5)[1] == 1.0
    assert format_success(7, 8, lo, hi) == "7/8 (88 %) [53, 98]"


def test_t_interval_matches_scipy() -> None:
    x = np.array([0.2, 0.35, 0.5, 0.41, 0.33])
    expected = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert t_interval(x) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(v) for v in t_interval([0.3]))
    assert format_interval(0.3, math.nan, math.nan, ".3f") == "0.300 [—]"
    assert format_interval(3.1e-5, 1.2e-5, 5e-5, ".1e") == "3.1e-05 [1.2e-05, 5.0e-05]"


def test_defense_rows_in_report_order(report: Path) -> None:
    expected = [make_defense(n, s).label for n, s in ALL_DEFENSES]
    table = pd.read_csv(report / "tables" / "leakage.csv")
    for dataset in ("lfw-faces", "digits"):
        assert list(table.loc[table["dataset"] == dataset, "defense_label"]) == expected
    assert list(dict.fromkeys(table["dataset"])) == ["lfw-faces", "digits"]  # run.json order
    summary = (report / "summary.md").read_text()
    section = summary.split("## digits")[1].split("##")[0]
    positions = [section.index(f"| {label} ") for label in expected]
    assert positions == sorted(positions)


def test_summary_statistics_match_records(report: Path) -> None:
    records = pd.read_csv(report / "records.csv")
    table = pd.read_csv(report / "tables" / "leakage.csv")
    for (dataset, label), group in records.groupby(["dataset", "defense_label"]):
        row = table[(table["dataset"] == dataset) & (table["defense_label"] == label)].iloc[0]
        assert row["n"] == len(group)
        assert row["successes"] == group["success"].sum()
        assert row["ssim_mean"] == pytest.approx(group["ssim"].mean())
        assert row["mse_median"] == pytest.approx(group["mse"].median())
        assert row["diverged"] == (group["status"] == "diverged").sum()


def test_notices_at_top_and_links(report: Path) -> None:
    lines = (report / "summary.md").read_text().splitlines()
    assert lines[0].startswith("# ") and "fake" in lines[0]
    assert lines[2] == f"> **Note:** {NOTICE}"
    text = "\n".join(lines)
    assert "`mse < 0.001`" in text
    for link in ("figures/leakage_vs_strength.png", "figures/reconstructions.pdf", "tables/leakage.tex"):
        assert f"({link})" in text and (report / link).is_file()
    assert "Wilson" in text and "Student-t" in text


def test_latex_has_booktabs_rules(report: Path) -> None:
    tex = (report / "tables" / "leakage.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "prune 10\\%" in tex


def test_figures_exist_and_are_nonempty(report: Path) -> None:
    for stem in ("leakage_vs_strength", "reconstructions"):
        png = (report / "figures" / f"{stem}.png").read_bytes()
        pdf = (report / "figures" / f"{stem}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert pdf.startswith(b"%PDF") and len(pdf) > 5_000


def test_write_report_is_deterministic(tmp_path: Path) -> None:
    make_fake_store(tmp_path, datasets=["digits"], defenses=ALL_DEFENSES[:4], images=2, seed=3)
    first = {p: p.read_bytes() for p in write_report(tmp_path)}
    second = {p: p.read_bytes() for p in write_report(tmp_path)}
    assert first.keys() == second.keys()
    assert {p.name for p in first} >= {"records.csv", "summary.md", "leakage.tex", "leakage_vs_strength.png"}
    for path, data in first.items():
        assert second[path] == data, path
    assert not list(tmp_path.rglob("*.tmp"))


def test_single_image_has_no_interval(tmp_path: Path) -> None:
    make_fake_store(tmp_path, datasets=["digits"], defenses=[("none", None)], images=1, seed=0)
    write_report(tmp_path)
    assert "[—]" in (tmp_path / "summary.md").read_text()


def test_empty_store_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="python -m bench run"):
        collect_records(tmp_path)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "abc.json.x1y2.tmp").write_text('{"records": [{"cell')
    with pytest.raises(UserError, match=str(tmp_path)):
        write_report(tmp_path)


def test_tmp_files_are_ignored(tmp_path: Path) -> None:
    make_fake_store(tmp_path, datasets=["digits"], defenses=[("none", None)], images=2, seed=0)
    (tmp_path / "cells" / "ffff.json.a8z.tmp").write_text('{"records": [{"half')
    (tmp_path / "cells" / "eeee.tmp.json").write_text("{")
    assert len(collect_records(tmp_path)) == 2


def test_corrupt_cell_names_the_file(tmp_path: Path) -> None:
    make_fake_store(tmp_path, datasets=["digits"], defenses=[("none", None)], images=1, seed=0)
    (tmp_path / "cells" / "0000bad.json").write_text('{"records": [')
    with pytest.raises(UserError, match="0000bad.json"):
        collect_records(tmp_path)
