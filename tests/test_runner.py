"""The matrix runner and CLI end to end: presets, cell ids, bad input, resume after SIGKILL, reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.config import load_preset, parse_only, select
from bench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "presets" / "tiny.toml")
METRIC_COLS = ["cell_id", "dataset", "defense", "strength", "image", "mse", "psnr", "ssim", "label_acc", "status",
               "closures", "success"]


def _run_cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLG_BENCH_COMPILE": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kw)


# -- presets and cells --------------------------------------------------------------------------------------

def test_every_shipped_preset_loads_and_covers_every_family():
    from defenses import DEFENSES

    families = {DEFENSES.get(n).family for n in DEFENSES.names()}
    for name in ("smoke", "default"):
        p = load_preset(name)
        assert {DEFENSES.get(d).family for d, _ in p.defenses} == families
        assert set(p.datasets) == {"mnist", "cifar10", "cifar100", "svhn", "lfw"}
    assert load_preset("default").attacks["dlg"]["steps"] == 300


def test_cell_id_is_stable_and_tracks_the_spec():
    cells = load_preset(TINY).cells()
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids) == 2 * 4
    assert ids == [c.cell_id for c in load_preset(TINY).cells()]
    c = cells[0]
    other = type(c)(**{**c.__dict__, "attack_settings": {**c.attack_settings, "steps": 4}})
    assert other.cell_id != c.cell_id
    engine_only = type(c)(**{**c.__dict__, "attack_settings": {**c.attack_settings, "engine": "compiled"}})
    assert engine_only.cell_id == c.cell_id  # execution detail, same results up to rounding


def test_only_filters_cells():
    cells = load_preset(TINY).cells()
    picked = select(cells, parse_only(["defense=none,int8", "dataset=digits"]))
    assert {(c.dataset, c.defense) for c in picked} == {("digits", "none"), ("digits", "int8")}
    assert [c.strength for c in select(cells, parse_only(["strength=0.001"]))] == [1e-3, 1e-3]
    assert {c.defense for c in select(cells, parse_only(["family=sparsity"]))} == {"prune"}
    with pytest.raises(UserError, match="allowed: dataset"):
        parse_only(["colour=red"])


BAD_PRESETS = [
    ("datasets = ['mnist', 'imagenet']", "unknown dataset 'imagenet'; allowed:"),
    ("[defenses]\ngaussian = [-1.0]", "variance must be > 0"),
    ("[defenses]\nprune = [150]", "sparsity must be in [0, 100)"),
    ("[defenses]\nnoise = [0.1]", "unknown defense 'noise'; allowed:"),
    ("[attacks.dlg]\nstepz = 3", "attacks.dlg.stepz: unknown setting"),
    ("images = 0", "images: must be a positive integer"),
    ("colour = 'red'", "colour: unknown key"),
    ("datasets = [", "malformed TOML"),
]


def _write_bad(tmp_path: Path, patch: str) -> Path:
    base = {
        "head": "datasets = ['digits']\nmodels = ['lenet-dlg']\nsuccess = { metric = 'mse', threshold = 1e-3 }\n",
        "att": "[attacks.dlg]\nsteps = 1\n",
        "def": "[defenses]\nnone = true\n",
    }
    if patch.startswith("datasets"):
        base["head"] = base["head"].replace("datasets = ['digits']", patch)
    elif patch.startswith("[defenses]"):
        base["def"] = patch + "\n"
    elif patch.startswith("[attacks"):
        base["att"] = patch + "\n"
    else:
        base["head"] = patch + "\n" + base["head"]
    path = tmp_path / "bad.toml"
    path.write_text(base["head"] + base["att"] + base["def"])
    return path


@pytest.mark.parametrize(("patch", "message"), BAD_PRESETS)
def test_bad_preset_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, patch, message):
    path = _write_bad(tmp_path, patch)
    out = tmp_path / "out"
    code = main(["run", "--preset", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--preset", "nosuch"], "unknown preset 'nosuch'; allowed: default"),
    (["run", "--preset", TINY, "--only", "colour=red"], "--only colour: unknown key"),
    (["run", "--preset", TINY, "--only", "dataset=mnist"], "not in preset"),
    (["run", "--preset", TINY, "--only", "defense=laplacian"], "selects no cell"),
    (["run", "--preset", TINY, "--workers", "many"], "--workers: expected a positive integer or 'auto'"),
    (["run", "--preset", TINY, "--workers", "0"], "--workers: expected a positive integer or 'auto', got '0'"),
    (["run", "--preset", TINY, "--lanes", "1.5"], "--lanes: expected a positive integer or 'auto', got '1.5'"),
    (["run", "--preset", TINY, "--lanes", "-3"], "--lanes: expected a positive integer or 'auto', got '-3'"),
    (["report", "--out", "/nonexistent/x"], "does not exist"),
])
def test_bad_cli_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "o")] if args[0] == "run" else args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_data_error_names_dataset_and_root(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(Path(TINY).read_text().replace('["digits", "lfw-faces"]', '["svhn"]'))
    r = _run_cli(["run", "--preset", str(preset), "--data-root", str(tmp_path / "empty"), "--out",
                  str(tmp_path / "o"), "--quiet"])
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "svhn" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "o").exists()


# -- end to end ------------------------------------------------------------------------------------------------

def test_run_writes_records_report_and_rerun_skips(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--preset", TINY, "--out", str(out), "--quiet"]) == 0
    assert "8 cells run, 0 already stored" in capsys.readouterr().out
    rec = pd.read_csv(out / "records.csv")
    assert len(rec) == 8 * 2
    assert set(rec.dataset) == {"digits", "lfw-faces"}
    assert rec.groupby("cell_id").size().eq(2).all()
    # Paired design: every defense of an image attacks the same model from the same start.
    assert rec.groupby(["dataset", "image"]).lane_seed.nunique().eq(1).all()
    for f in ("summary.md", "tables/leakage.md", "figures/leakage_vs_strength.png", "figures/reconstructions.pdf"):
        assert (out / f).stat().st_size > 0
    assert main(["run", "--preset", TINY, "--out", str(out), "--quiet"]) == 0
    assert "0 cells run, 8 already stored" in capsys.readouterr().out


def test_progress_bar_stops_at_the_total():
    """Progress arrives as fractions of attacks per round; their float sum can exceed the total
    (tqdm warned "clamping frac" at the end of real two-worker runs). The bar absorbs it."""
    import warnings

    from bench.runner import AttackBar

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = AttackBar(3, quiet=False)
        for k in range(1, 4):
            bar.advance(k * (1 + 1e-9))
        bar.advance(2)
        assert bar.n == 3
        bar.close()
    assert not [w for w in caught if "clamping" in str(w.message)]


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc; empty elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_run_resumes_to_the_same_table(tmp_path):
    """SIGKILL mid-run, rerun: nothing finished is lost and the table equals an uninterrupted run's."""
    args = ["run", "--preset", TINY, "--lanes", "1", "--quiet", "--no-report"]
    # Eager tensor code, no C kernels: with them the 8 tiny cells finish before a kill can land.
    slow = {"DLG_BENCH_KERNELS": "0"}
    full = tmp_path / "full"
    assert _run_cli([*args, "--out", str(full)], slow).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "DLG_BENCH_COMPILE": "0", **slow}
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "cells").glob("*.json"))) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10  # the workers die with their driver (Linux: PR_SET_PDEATHSIG)
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "workers outlived the killed driver"
    done_before = len(list((killed / "cells").glob("*.json")))
    assert 2 <= done_before < 8, "the kill should land mid-run"
    r = _run_cli([*args, "--out", str(killed)], slow)
    assert r.returncode == 0, r.stderr
    assert f"{8 - done_before} cells run, {done_before} already stored" in r.stdout
    assert main(["report", "--out", str(full)]) == 0
    assert main(["report", "--out", str(killed)]) == 0
    a = pd.read_csv(full / "records.csv")[METRIC_COLS]
    b = pd.read_csv(killed / "records.csv")[METRIC_COLS]
    pd.testing.assert_frame_equal(a, b)
    assert (full / "tables" / "leakage.md").read_bytes() == (killed / "tables" / "leakage.md").read_bytes()


def test_numbers_do_not_depend_on_workers_lanes_or_the_other_cells(tmp_path):
    """The same cells give the same numbers, to the last digit, in one process with every lane of a
    dataset together, in two single-threaded workers with each lane alone, and run on their own."""
    args = ["run", "--preset", TINY, "--quiet", "--no-report"]
    runs = {"together": ["--workers", "1", "--lanes", "32"], "apart": ["--workers", "2", "--lanes", "1"],
            "alone": ["--workers", "1", "--only", "defense=int8,prune"]}
    tables = {}
    for name, extra in runs.items():
        r = _run_cli([*args, *extra, "--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr
        assert main(["report", "--out", str(tmp_path / name)]) == 0
        tables[name] = pd.read_csv(tmp_path / name / "records.csv")[METRIC_COLS].sort_values(["cell_id", "image"])
    together = tables["together"].reset_index(drop=True)
    pd.testing.assert_frame_equal(tables["apart"].reset_index(drop=True), together, check_exact=True)
    alone = tables["alone"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, together[together.cell_id.isin(alone.cell_id)].reset_index(drop=True),
                                  check_exact=True)


def test_embedded_fallback_is_announced_never_silent(tmp_path):
    out = tmp_path / "out"
    preset = tmp_path / "p.toml"
    preset.write_text(Path(TINY).read_text().replace('["digits", "lfw-faces"]', '["mnist", "lfw"]')
                      .replace('"error"', '"embedded"').replace("gaussian = [1e-3]\n", "")
                      .replace("int8 = true\n", "").replace("prune = [50]\n", ""))
    r = _run_cli(["run", "--preset", str(preset), "--data-root", str(tmp_path / "empty"), "--out", str(out),
                  "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "embedded" in r.stderr
    assert set(pd.read_csv(out / "records.csv").dataset) == {"digits", "lfw-faces"}
    summary = (out / "summary.md").read_text()
    assert summary.index("embedded") < summary.index("|")  # the notice comes before any table


def test_compile_fallback_is_announced_in_run_json_and_reports(tmp_path, monkeypatch, capsys, no_compiler):
    """Where torch.compile fails, the compiled engine runs eagerly (same numbers) and the run says so:
    a note on stderr, in run.json's notices and in both reports, which a resumed run keeps."""
    import json

    import attacks.dlg as dlg
    import attacks.lbfgs as lbfgs
    from attacks import lbfgs_kernels

    # lenet-dlg's objective is a C kernel; without the L-BFGS kernel the tensor round is compiled.
    monkeypatch.setattr(lbfgs_kernels.KERNELS, "libs", {torch.float32: None})
    out = tmp_path / "out"
    args = ["run", "--preset", TINY, "--out", str(out), "--quiet", "--workers", "1", "--engine", "compiled"]
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert main([*args, "--only", "defense=none"]) == 0
    wanted = "torch.compile of the L-BFGS update failed (RuntimeError: no compiler)"
    assert wanted in capsys.readouterr().err
    # Resumed without compiling: its own cells fall back to nothing, the first cells' notice stays.
    monkeypatch.setattr(lbfgs, "_COMPILED", {})
    monkeypatch.setattr(dlg, "_OBJECTIVES", {})
    monkeypatch.setenv("DLG_BENCH_COMPILE", "0")
    assert main(args) == 0
    assert "6 cells run, 2 already stored" in capsys.readouterr().out
    assert any(n.startswith(wanted) for n in json.loads((out / "run.json").read_text())["notices"])
    for report in ("summary.md", "REPRODUCTION.md"):
        assert wanted in (out / report).read_text()


def test_smoke_preset_on_real_data(tmp_path, data_root, capsys):
    """Every card dataset and defense family through the whole pipeline on the real files."""
    out = tmp_path / "smoke"
    assert main(["run", "--preset", "smoke", "--data-root", str(data_root), "--out", str(out), "--quiet"]) == 0
    rec = pd.read_csv(out / "records.csv")
    assert set(rec.dataset) == {"mnist", "cifar10", "cifar100", "svhn", "lfw"}
    assert set(rec.family) == {"none", "noise", "precision", "sparsity"}
    assert rec.dataset_origin.str.contains(str(data_root)).all()
    assert rec[["mse", "ssim", "psnr"]].notna().all().all()


def test_units_split_groups_evenly_and_cover_every_cell():
    """Each unit holds one (dataset, model, attack, ...) group's whole cells, at most QUEUE_FACTOR x
    slots attacks, groups split into near-equal units, costliest first; every cell exactly once."""
    from bench.config import load_preset
    from bench.runner import QUEUE_FACTOR, plan_units

    cells = load_preset("paper").cells(["mnist", "lfw"])  # 21 cells of 8 attacks per dataset
    units = plan_units(cells, 32)
    assert sorted(c.cell_id for u in units for c in u) == sorted(c.cell_id for c in cells)
    sizes = [sum(c.images for c in u) for u in units]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= QUEUE_FACTOR * 32
    assert all(len({c.dataset for c in u}) == 1 for u in units)
    assert sorted(len(u) for u in units) == [10, 10, 11, 11]  # 168 attacks -> 2 units per dataset
    assert len(plan_units(cells, 1)) == len(cells)  # a cell is never split
    costly_first = plan_units(cells, 32, {"mnist": 10, "lfw": 641})
    assert [u[0].dataset for u in costly_first] == ["lfw", "lfw", "mnist", "mnist"]


def test_class_count_from_the_registry_or_the_files(data_root, tmp_path):
    from bench.data import class_count, open_dataset

    assert class_count("cifar100", tmp_path) == 100  # static: no files needed
    assert class_count("lfw", data_root) == open_dataset("lfw", root=data_root).num_classes > 100
    assert class_count("lfw", tmp_path) == 0  # not there: no estimate, no error


def test_slots_shrink_only_where_the_lanes_weights_are_large():
    """LFW-sized last layers (641 x 768) get fewer slots; CIFAR-sized ones keep --lanes."""
    from attacks import Lane
    from bench.runner import SLOT_BYTES, fit_slots

    def lane(classes: int) -> Lane:
        params = {"w": torch.zeros(classes, 768), "b": torch.zeros(classes)}
        return Lane(params=params, target_grads={k: v.clone() for k, v in params.items()}, seed=0)

    assert fit_slots(32, lane(10)) == 32 and fit_slots(32, lane(100)) == 32
    assert fit_slots(32, lane(641)) == SLOT_BYTES // (2 * 641 * 769 * 4) == 12
    assert fit_slots(4, lane(641)) == 4 and fit_slots(32, lane(100_000)) == 1


def test_auto_workers_and_lanes_follow_the_device(monkeypatch):
    """``auto``: one worker per CPU core with AUTO_LANES["cpu"] lanes each; one process on CUDA with
    AUTO_LANES["cuda"]. A number is taken as given."""
    from bench.runner import AUTO_LANES, resolve_lanes, resolve_workers

    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert (resolve_workers("auto", "cpu"), resolve_workers("auto", "cuda"), resolve_workers("3", "cuda")) == (6, 1, 3)
    assert (resolve_lanes("auto", "cpu"), resolve_lanes("auto", "cuda")) == (AUTO_LANES["cpu"], AUTO_LANES["cuda"])
    assert resolve_lanes(" 7", "cpu") == resolve_lanes(7, "cuda") == 7
    assert AUTO_LANES["cpu"] < AUTO_LANES["cuda"]
