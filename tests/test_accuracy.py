"""Tests for bench/accuracy.py: job expansion, validation, resumable runs, clean/drop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.accuracy import (
    JOB_ONLY_KEYS,
    AccuracyJob,
    accuracy_jobs,
    collect_accuracy,
    pending_jobs,
    resolve_training_datasets,
    run_accuracy,
    split_description,
)
from bench.config import parse_only, parse_preset, select
from bench.errors import UserError
from bench.store import atomic_write_json

TRAINING = {"datasets": ["digits"], "model": "convnet", "epochs": 1, "batch_size": 32, "workers": 2, "lr": 0.05,
            "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0, 1], "train_limit": 200, "augment": False}


def _preset(training: dict | None = None, *, name: str = "t", defenses: dict | None = None, **extra):
    raw = {"datasets": ["digits"], "models": ["lenet-dlg"], "attacks": {"dlg": {"steps": 2}},
           "defenses": defenses or {"none": True, "gaussian": [1e-2], "prune": [50]},
           "success": {"metric": "mse", "threshold": 1e-3}, "image_size": 8, **extra}
    if training is not None:
        raw["training"] = training
    return parse_preset(raw, name=name, where=f"{name}.toml")


def test_jobs_are_the_product_of_datasets_settings_and_seeds() -> None:
    jobs = accuracy_jobs(_preset(TRAINING))
    assert len(jobs) == 1 * 3 * 2
    assert [(j.defense, j.strength, j.seed) for j in jobs] == [
        ("none", None, 0), ("none", None, 1), ("gaussian", 1e-2, 0), ("gaussian", 1e-2, 1),
        ("prune", 50.0, 0), ("prune", 50.0, 1)]  # fmt: skip
    assert all(j.image_size == 8 and j.model == "convnet" and j.train_limit == 200 for j in jobs)
    ids = [j.job_id for j in jobs]
    assert len(set(ids)) == len(ids) and all(len(i) == 16 for i in ids)


def test_job_ids_are_stable_and_follow_the_spec() -> None:
    a = accuracy_jobs(_preset(TRAINING))
    assert [j.job_id for j in a] == [j.job_id for j in accuracy_jobs(_preset(TRAINING))]
    assert [j.job_id for j in a] == [j.job_id for j in accuracy_jobs(_preset(TRAINING, name="other"))]
    longer = accuracy_jobs(_preset({**TRAINING, "epochs": 2}))
    assert not {j.job_id for j in a} & {j.job_id for j in longer}
    job = a[0]
    assert job.spec()["kind"] == "accuracy" and "preset" not in job.spec()
    assert AccuracyJob(**{**job.__dict__}).job_id == job.job_id


def test_only_filter_selects_jobs() -> None:
    jobs = accuracy_jobs(_preset(TRAINING))
    only = parse_only(["family=noise,sparsity", "seed=1", "strength=50"])
    assert set(only) <= set(JOB_ONLY_KEYS)
    assert [(j.defense, j.strength, j.seed) for j in select(jobs, only)] == [("prune", 50.0, 1)]


def test_defaults_datasets_argument_and_no_training_table() -> None:
    minimal = {"datasets": ["digits"], "model": "convnet", "epochs": 1}
    jobs = accuracy_jobs(_preset(minimal, seeds=[3]))
    assert {(j.batch_size, j.workers, j.lr, j.momentum, j.weight_decay, j.augment, j.train_limit) for j in jobs} == {
        (64, 4, 0.05, 0.9, 5e-4, False, None)}
    assert {j.seed for j in jobs} == {3}  # training seeds default to the preset's seeds
    assert {j.dataset for j in accuracy_jobs(_preset(minimal), ["mnist", "digits"])} == {"mnist", "digits"}
    assert accuracy_jobs(_preset(None)) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"epochs": 0}, "t.toml: training.epochs: must be a positive integer, got 0"),
    ({"epochs": 1.5}, "t.toml: training.epochs: must be a positive integer, got 1.5"),
    ({"batch_size": 1}, "t.toml: training.batch_size: must be >= workers (2)"),
    ({"workers": True}, "t.toml: training.workers: must be a positive integer, got True"),
    ({"lr": 0}, "t.toml: training.lr: must be a finite number > 0, got 0"),
    ({"momentum": 1.0}, "t.toml: training.momentum: must be a number in [0, 1), got 1.0"),
    ({"weight_decay": -1}, "t.toml: training.weight_decay: must be a finite number >= 0"),
    ({"seeds": []}, "t.toml: training.seeds: must be a non-empty list of integers"),
    ({"train_limit": 0}, "t.toml: training.train_limit: must be a positive integer"),
    ({"augment": "yes"}, "t.toml: training.augment: must be true or false"),
    ({"model": "vgg"}, "t.toml: training.model: unknown model 'vgg'"),
    ({"datasets": ["lfw"]}, "t.toml: training.datasets: 'lfw' has no train split"),
    ({"datasets": ["imagenet"]}, "t.toml: training.datasets: unknown dataset 'imagenet'"),
    ({"datasets": "mnist"}, "t.toml: training.datasets: must be a non-empty list"),
    ({"epoch": 3}, "t.toml: training.epoch: unknown key; allowed: datasets, model, epochs"),
])  # fmt: skip
def test_bad_training_values_are_one_line_user_errors(change: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        accuracy_jobs(_preset({**TRAINING, **change}))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_missing_required_key() -> None:
    with pytest.raises(UserError, match=r"^t\.toml: training\.model: missing"):
        accuracy_jobs(_preset({"datasets": ["digits"], "epochs": 1}))


def test_split_description() -> None:
    assert split_description("mnist", 5000, 10000) == "MNIST 5k train subset / 10k test"
    assert split_description("cifar10", 50000, 10000) == "CIFAR-10 50k train / 10k test"
    assert split_description("digits", 1437, 360) == "digits 1,437 train / 360 test"


def test_resolve_training_datasets_embedded_fallback(tmp_path: Path) -> None:
    preset = _preset({**TRAINING, "datasets": ["mnist", "cifar10"]}, on_missing_data="embedded")
    datasets, notices = resolve_training_datasets(preset, tmp_path)
    assert datasets == ["digits"] and "embedded digits" in notices[0]
    with pytest.raises(UserError, match="mnist"):
        resolve_training_datasets(_preset({**TRAINING, "datasets": ["mnist"]}, on_missing_data="error"), tmp_path)
    assert resolve_training_datasets(_preset(TRAINING), tmp_path) == (["digits"], [])


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread (and do not thrash when the CPU is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_writes_rows_and_resumes(tmp_path: Path, one_thread: None) -> None:
    preset = _preset({**TRAINING, "seeds": [0]}, defenses={"none": True, "int8": True})
    jobs = accuracy_jobs(preset)
    seen: list[float] = []
    assert pending_jobs(jobs, tmp_path) == jobs
    first = run_accuracy(jobs, out=tmp_path, data_root=tmp_path, device="cpu", progress=seen.append)
    assert (first["ran"], first["skipped"]) == (2, 0)
    assert seen and seen[-1] == 2.0 and seen == sorted(seen)
    files = sorted((tmp_path / "accuracy").glob("*.json"))
    assert [p.stem for p in files] == sorted(j.job_id for j in jobs)
    stamps = [p.stat().st_mtime_ns for p in files]
    row = json.loads(files[0].read_text())["row"]
    assert row["split"] == "digits 200 train subset / 360 test"
    assert (row["train_images"], row["test_images"], row["epochs"], row["workers"]) == (200, 360, 1, 2)
    assert 0.0 <= row["test_accuracy"] <= 1.0 and row["diverged"] is False
    for key in ("torch", "python", "git_rev", "seconds", "train_loss", "family", "defense_label"):
        assert key in row
    assert pending_jobs(jobs, tmp_path) == []
    again = run_accuracy(jobs, out=tmp_path, data_root=tmp_path, device="cpu")
    assert (again["ran"], again["skipped"]) == (0, 2)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    frame = collect_accuracy(tmp_path, jobs)
    assert len(frame) == 2 and not list(tmp_path.glob("accuracy/*.tmp"))
    none = frame[frame["defense"] == "none"].iloc[0]
    assert none["drop"] == 0.0 and none["clean_accuracy"] == none["test_accuracy"]


def _fake(out: Path, job_id: str, **row) -> None:
    base = {"job_id": job_id, "dataset": "mnist", "model": "convnet", "seed": 0, "epochs": 2, "batch_size": 64,
            "workers": 4, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "train_limit": None, "augment": False,
            "image_size": 32, "family": "none", "strength": None, "test_images": 100, "diverged": False}
    atomic_write_json(out / "accuracy" / f"{job_id}.json", {"spec": {}, "row": {**base, **row}})


def test_clean_accuracy_and_drop(tmp_path: Path) -> None:
    _fake(tmp_path, "a0", defense="none", test_accuracy=0.98)
    _fake(tmp_path, "a1", defense="none", seed=1, test_accuracy=0.96)
    _fake(tmp_path, "b0", defense="int8", family="precision", strength=8.0, test_accuracy=0.90)
    _fake(tmp_path, "b1", defense="int8", family="precision", strength=8.0, seed=1, test_accuracy=0.95)
    _fake(tmp_path, "c0", defense="int8", family="precision", strength=8.0, epochs=3, test_accuracy=0.5)  # no clean
    _fake(tmp_path, "d0", dataset="cifar10", defense="none", test_accuracy=0.6)
    frame = collect_accuracy(tmp_path).set_index("job_id")
    assert list(frame.index) == ["a0", "a1", "b0", "b1", "c0", "d0"]
    assert frame.loc["b0", "clean_accuracy"] == 0.98 and frame.loc["b0", "drop"] == pytest.approx(0.08)
    assert frame.loc["b1", "clean_accuracy"] == 0.96 and frame.loc["b1", "drop"] == pytest.approx(0.01)
    assert math.isnan(frame.loc["c0", "clean_accuracy"]) and math.isnan(frame.loc["c0", "drop"])
    assert frame.loc["d0", "drop"] == 0.0
    assert collect_accuracy(tmp_path / "nothing").empty
    assert isinstance(collect_accuracy(tmp_path / "nothing"), pd.DataFrame)


def test_damaged_result_is_an_error_for_reading_and_rerun_for_running(tmp_path: Path) -> None:
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json"):
        collect_accuracy(tmp_path)
