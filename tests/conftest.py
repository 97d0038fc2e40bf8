import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (../shared/data in CI). Missing: skip, unless DLG_BENCH_REQUIRE_DATA=1 (CI) makes it fail."""
    root = Path(os.environ.get("DLG_BENCH_DATA") or REPO.parent / "shared" / "data")
    if not (root / "MNIST").is_dir():
        if os.environ.get("DLG_BENCH_REQUIRE_DATA") == "1":
            pytest.fail(f"real data not found under {root}; set DLG_BENCH_DATA")
        pytest.skip(f"real data not found under {root}; set DLG_BENCH_DATA to run this test")
    return root


@pytest.fixture
def no_compiler(monkeypatch):
    """torch.compile that fails on the first call ("RuntimeError: no compiler"), with the engine's
    caches of compiled functions emptied, so the attack objective and L-BFGS update must fall back."""
    import torch

    import attacks.dlg as dlg
    import attacks.lbfgs as lbfgs

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(lbfgs, "_COMPILED", {})
    monkeypatch.setattr(dlg, "_OBJECTIVES", {})
    monkeypatch.delenv("DLG_BENCH_COMPILE", raising=False)
