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
