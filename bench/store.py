"""The results store: one JSON (records) + one NPZ (images) per finished cell.

Writes are atomic (temp file + ``os.replace``) and the JSON is written last, so a
cell counts as finished only when both files are complete; a run killed at any
point resumes by skipping finished cells and loses at most the cells in flight.
Only the driver process writes here.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.cells = self.out / "cells"

    def done(self, cell_id: str) -> bool:
        return (self.cells / f"{cell_id}.json").is_file() and (self.cells / f"{cell_id}.npz").is_file()

    def write_cell(self, cell_id: str, spec: dict, records: list[dict], meta: dict,
                   arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(self.cells / f"{cell_id}.npz", buf.getvalue())
        atomic_write_json(self.cells / f"{cell_id}.json", {"spec": spec, "records": records, "meta": meta})

    def metas(self) -> list[dict]:
        """The ``meta`` of every finished cell."""
        return [json.loads(p.read_text()).get("meta", {}) for p in sorted(self.cells.glob("*.json"))]
