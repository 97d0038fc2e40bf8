"""The report: ``records.csv``, summary tables and figures from a results store.

Input is the folder a run wrote (see :mod:`bench.store` and :mod:`bench.runner`)::

    out/run.json              preset name, success rule, notices, datasets
    out/cells/<cell_id>.json  {"spec", "records": [row, ...], "meta"}
    out/cells/<cell_id>.npz   originals / reconstructions, uint8 [lanes, B, C, H, W]

:func:`write_report` writes, under ``out/``: ``records.csv`` (every row of every
cell, tidy long format), ``summary.md``, ``tables/leakage.{md,tex,csv}`` and
``figures/{leakage_vs_strength,reconstructions}.{png,pdf}``. Output is a pure
function of the store: the same store gives byte-identical files. Every file is
written atomically (temp file, then ``os.replace``).

Statistics, per (dataset, defense setting) over victim images x seeds (rows of
records.csv); when model, attack or batch size vary within a store they split the
groups too, so different experiments are never pooled:

* success rate with a 95 % Wilson score interval;
* mean SSIM and mean MSE, each with a 95 % Student-t interval
  (mean +- t_{0.975, n-1} s / sqrt(n), ``scipy.stats.t``), clipped to the metric's
  range (SSIM [-1, 1], MSE [0, 1]); no interval for n = 1;
* median MSE; number of diverged attacks.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from bench.errors import UserError
from bench.metrics import METRICS, SuccessRule, match_reconstructions, parse_success
from bench.store import atomic_write_bytes

__all__ = [
    "COLUMNS",
    "collect_records",
    "format_interval",
    "format_success",
    "order_settings",
    "plot_leakage_vs_strength",
    "plot_reconstructions",
    "read_run_info",
    "summarize",
    "t_interval",
    "wilson_interval",
    "write_report",
]

#: Documented record columns, in this order; any other keys follow, sorted.
COLUMNS: tuple[str, ...] = (
    "cell_id", "preset", "dataset", "dataset_origin", "model", "attack", "engine",
    "defense", "family", "parameter", "strength", "defense_label", "batch_size",
    "image", "slot", "seed", "mse", "psnr", "ssim", "label_acc", "success", "status",
    "closures", "steps_run", "final_loss", "seconds", "torch", "torchvision", "python",
    "git_rev", "device",
)  # fmt: skip
CONFIDENCE = 0.95
#: Row order of defense settings: families, then defenses within a family, then strength.
FAMILY_ORDER = ("none", "noise", "precision", "sparsity")
DEFENSE_ORDER = ("none", "gaussian", "laplacian", "fp16", "bf16", "int8", "prune")
#: Besides the dataset, these split summary groups and figure columns when they vary.
SPLIT_KEYS = ("model", "attack", "batch_size")
SETTING_KEYS = ("family", "defense", "parameter", "strength", "defense_label")
#: Strength parameter -> (x-axis label with unit, axis kind).
STRENGTH_AXES = {
    "variance": ("noise variance σ² (log scale)", "log"),
    "bits": ("gradient precision (bits)", "categorical"),
    "sparsity": ("pruned gradient entries (%)", "linear"),
}
#: Natural range of the metrics, for clipping intervals.
RANGES = {"ssim": (-1.0, 1.0), "mse": (0.0, 1.0)}
DASH = {"md": "—", "tex": "--"}
#: Left-aligned table columns (the rest are numbers, right-aligned).
TEXT_COLUMNS = ("dataset", "model", "attack", "defense")

# Styling.
PANEL_IN = (3.0, 2.2)  # width, height per panel of figure 1
TILE_IN = 0.85  # side of one image of figure 2
LABEL_IN = 1.5  # row-label margin of figure 2
DPI = 200
PNG_META = {"Software": None}
PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 10,
    "svg.hashsalt": "dlg-bench",
    "pdf.fonttype": 42,
}


# --------------------------------------------------------------------------- input


def _cell_files(out: Path) -> list[Path]:
    """Finished cells, sorted by cell id; temp files (``*.tmp``) are never read."""
    cells = out / "cells"
    if not cells.is_dir():
        return []
    files = (p for p in cells.glob("*.json") if p.is_file())
    return sorted((p for p in files if not p.stem.endswith(".tmp")), key=lambda p: p.name)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: {what} is not valid JSON ({exc.msg}, line {exc.lineno}); "
            "delete it and rerun `python -m bench run` to recompute it"
        ) from None


def _read_cell(path: Path) -> list[dict]:
    cell = _read_json(path, "cell file")
    records = cell.get("records") if isinstance(cell, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(
            f"{path}: expected an object with a list of records; "
            "delete it and rerun `python -m bench run` to recompute it"
        )
    return records


def collect_records(out: Path) -> pd.DataFrame:
    """All rows of all stored cells (cells sorted by id, rows in stored order).

    Columns: :data:`COLUMNS` (always, empty where the store lacks one), then any
    other keys the rows carry, sorted by name.
    """
    out = Path(out)
    rows = [row for path in _cell_files(out) for row in _read_cell(path)]
    if not rows:
        raise UserError(
            f"{out}: no results in {out / 'cells'}; run `python -m bench run --out {out}` first"
        )
    records = pd.DataFrame.from_records(rows)
    extra = sorted(set(records.columns) - set(COLUMNS))
    return records.reindex(columns=[*COLUMNS, *extra]).reset_index(drop=True)


def load_records(out: Path) -> pd.DataFrame:
    """The run's records: from the cells store when it holds any, else from ``records.csv``.

    A committed results folder keeps records.csv, accuracy/ and run.json but not the
    store (its arrays are large), so its tables and REPRODUCTION.md can be regenerated
    from the records alone; image figures read ``figure_arrays.npz`` (blank tiles without it).
    """
    out = Path(out)
    path = out / "records.csv"
    if _cell_files(out) or not path.is_file():
        return collect_records(out)
    try:
        records = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: unreadable records ({type(exc).__name__}); rerun `python -m bench run --out "
                        f"{out}` to rebuild it") from None
    missing = [c for c in ("cell_id", "dataset", "defense", "mse") if c not in records.columns]
    if missing:
        raise UserError(f"{path}: not a records table (missing columns {', '.join(missing)}); rerun "
                        f"`python -m bench run --out {out}` to rebuild it")
    return records


FIGURE_ARRAYS = "figure_arrays.npz"


class CellArrays:
    """Lane 0's arrays of each cell, for figures: from ``cells/<id>.npz``, else from the
    results folder's ``figure_arrays.npz`` (what a committed results folder keeps instead
    of the store). ``get`` returns None for a cell neither holds."""

    def __init__(self, out: Path):
        self.cells = Path(out) / "cells"
        self.bundle: dict[str, dict[str, np.ndarray]] = {}
        path = Path(out) / FIGURE_ARRAYS
        if path.is_file():
            try:
                with np.load(path) as z:
                    for key in z.files:
                        cid, _, name = key.partition("/")
                        self.bundle.setdefault(cid, {})[name] = z[key]
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise UserError(f"{path}: unreadable ({type(exc).__name__}); delete it, or rerun `python -m "
                                f"bench report --out {out}` where the cells store exists") from None

    def get(self, cell_id: str) -> dict[str, np.ndarray] | None:
        try:
            with np.load(self.cells / f"{cell_id}.npz") as z:
                return {k: z[k][:1] for k in z.files}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return self.bundle.get(cell_id)


def figure_arrays(records: pd.DataFrame, arrays: CellArrays) -> bytes | None:
    """The bundle of lane 0's arrays of every cell (snapshots only of undefended cells: the
    iteration figure's); None when no cell's arrays are readable."""
    entries = {}
    for cid, defense in records.groupby("cell_id", sort=True)["defense"].first().items():
        for name, value in (arrays.get(str(cid)) or {}).items():
            if defense == "none" or not name.startswith("snap_"):
                entries[f"{cid}/{name}"] = value
    if not entries:
        return None
    buf = io.BytesIO()
    np.savez_compressed(buf, **entries)
    return buf.getvalue()


def read_run_info(out: Path) -> dict:
    """``out/run.json`` as a dict ({} if the run wrote none)."""
    path = Path(out) / "run.json"
    if not path.is_file():
        return {}
    info = _read_json(path, "run info")
    return info if isinstance(info, dict) else {}


def _success_rule(info: dict, out: Path) -> SuccessRule | None:
    if "success" not in info:
        return None
    return parse_success(info["success"], key=f"{Path(out) / 'run.json'}: success")


# ---------------------------------------------------------------------- statistics


def wilson_interval(
    successes: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (NaNs for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(
    values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Student-t interval for the mean (NaNs for fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * sem
    return mean - half, mean + half


def _mean_ci(values: pd.Series, metric: str) -> dict[str, float]:
    lo, hi = t_interval(values.to_numpy(dtype=np.float64))
    low, high = RANGES[metric]
    return {
        f"{metric}_mean": float(values.mean()),
        f"{metric}_lo": max(lo, low) if not math.isnan(lo) else lo,
        f"{metric}_hi": min(hi, high) if not math.isnan(hi) else hi,
    }


def _group_stats(group: pd.DataFrame) -> dict[str, Any]:
    n = len(group)
    wins = int(group["success"].fillna(False).astype(bool).sum())
    lo, hi = wilson_interval(wins, n)
    return {
        "n": n,
        "successes": wins,
        "success_rate": wins / n,
        "success_lo": lo,
        "success_hi": hi,
        **_mean_ci(group["ssim"], "ssim"),
        **_mean_ci(group["mse"], "mse"),
        "mse_median": float(group["mse"].median()),
        "diverged": int((group["status"] == "diverged").sum()),
    }


def _rank(value: object, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def setting_key(family: object, defense: object, strength: object, label: object) -> tuple:
    """Sort key of a defense setting: none, noise, precision, sparsity, then others."""
    s = float(strength) if strength is not None and not pd.isna(strength) else -math.inf
    return (
        _rank(family, FAMILY_ORDER), str(family),
        _rank(defense, DEFENSE_ORDER), str(defense), s, str(label),
    )  # fmt: skip


def order_settings(frame: pd.DataFrame) -> list[str]:
    """Distinct ``defense_label`` values of ``frame`` in report order."""
    settings = frame.drop_duplicates("defense_label")
    keyed = [
        (setting_key(r.family, r.defense, r.strength, r.defense_label), r.defense_label)
        for r in settings.itertuples(index=False)
    ]
    return [label for _, label in sorted(keyed)]


def facet_keys(records: pd.DataFrame) -> list[str]:
    """``dataset`` plus the split keys that take more than one value."""
    split = [k for k in SPLIT_KEYS if records[k].nunique(dropna=False) > 1]
    return ["dataset", *split]


def dataset_order(records: pd.DataFrame, info: dict) -> list[str]:
    """Datasets in the run's order (run.json), then any others alphabetically."""
    present = sorted(set(records["dataset"].dropna().astype(str)))
    listed = info.get("datasets", [])
    listed = list(listed) if isinstance(listed, (list, dict)) else []
    first = [d for d in dict.fromkeys(map(str, listed)) if d in present]
    return first + [d for d in present if d not in first]


def _facet_sort_key(values: tuple, keys: Sequence[str], datasets: list[str]) -> tuple:
    return tuple(
        _rank(v, datasets) if k == "dataset" else (0, v) if isinstance(v, (int, float)) else (1, str(v))
        for k, v in zip(keys, values)
    )


def summarize(records: pd.DataFrame, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (facet, defense setting) with n, success and metric statistics."""
    facets = facet_keys(records)
    keys = [*facets, *SETTING_KEYS]
    datasets = list(datasets) if datasets is not None else sorted(records["dataset"].unique())
    rows = [
        {**dict(zip(keys, key)), **_group_stats(group)}
        for key, group in records.groupby(keys, dropna=False, sort=False)
    ]

    def order(row: dict) -> tuple:
        facet = _facet_sort_key(tuple(row[k] for k in facets), facets, datasets)
        setting = setting_key(row["family"], row["defense"], row["strength"], row["defense_label"])
        return facet + setting

    return pd.DataFrame(sorted(rows, key=order)).reset_index(drop=True)


# ---------------------------------------------------------------------- formatting


def format_success(successes: int, n: int, lo: float, hi: float) -> str:
    """``7/8 (88 %) [53, 98]``: count, rate and interval in percent."""
    return f"{successes}/{n} ({_percent(successes / n)} %) [{_percent(lo)}, {_percent(hi)}]"


def format_interval(mean: float, lo: float, hi: float, spec: str, dash: str = DASH["md"]) -> str:
    """``0.912 [0.850, 0.974]``; ``0.912 [—]`` without an interval."""
    if math.isnan(lo) or math.isnan(hi):
        return f"{mean:{spec}} [{dash}]"
    return f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def facet_label(values: dict[str, Any]) -> str:
    parts = [str(values["dataset"])]
    parts += [f"B={v}" if k == "batch_size" else str(v) for k, v in values.items() if k != "dataset"]
    return " · ".join(parts)


def format_table(summary: pd.DataFrame, facets: Sequence[str], dash: str) -> pd.DataFrame:
    """Human-readable table: facet columns, then defense and the statistics."""
    ci = f"{100 * CONFIDENCE:.0f} % CI"
    columns: dict[str, list] = {k: list(summary[k]) for k in facets}
    columns["defense"] = list(summary["defense_label"])
    columns[f"success [{ci}]"] = [
        format_success(r.successes, r.n, r.success_lo, r.success_hi) for r in summary.itertuples()
    ]
    columns[f"mean SSIM [{ci}]"] = [
        format_interval(r.ssim_mean, r.ssim_lo, r.ssim_hi, ".3f", dash) for r in summary.itertuples()
    ]
    columns[f"mean MSE [{ci}]"] = [
        format_interval(r.mse_mean, r.mse_lo, r.mse_hi, ".1e", dash) for r in summary.itertuples()
    ]
    columns["median MSE"] = [f"{v:.1e}" for v in summary["mse_median"]]
    columns["n"] = list(summary["n"])
    columns["diverged"] = list(summary["diverged"])
    return pd.DataFrame(columns)


def _markdown(table: pd.DataFrame) -> str:
    align = ["left" if c in TEXT_COLUMNS else "right" for c in table]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def _latex(table: pd.DataFrame, rule: SuccessRule | None) -> str:
    where = ""
    if rule is not None:
        op = "$<$" if METRICS.get(rule.metric).leakage_direction == "lower" else "$>$"
        where = f" (rule: {rule.metric.replace('_', chr(92) + '_')} {op} {rule.threshold:g})"
    caption = (
        f"Gradient leakage per defense setting: attack success{where} with "
        r"95\,\% Wilson interval; mean SSIM and MSE with 95\,\% Student-$t$ intervals."
    )
    return table.to_latex(
        index=False,
        escape=True,
        column_format="".join("l" if c in TEXT_COLUMNS else "r" for c in table),
        caption=caption,
        label="tab:leakage",
    )


def _rule_text(rule: SuccessRule | None) -> str:
    if rule is None:
        return "the preset's success rule (not recorded in run.json)"
    direction = METRICS.get(rule.metric).leakage_direction
    return f"`{rule}` ({rule.metric}: {direction} = more leakage)"


def _direction_words(metric: str) -> str:
    return f"{METRICS.get(metric).leakage_direction} {metric.upper()}"


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _percent(fraction: float) -> int:
    """Whole percent, halves rounded up (7/8 -> 88)."""
    return math.floor(100 * fraction + 0.5)


def render_summary(
    records: pd.DataFrame, summary: pd.DataFrame, info: dict, rule: SuccessRule | None,
    datasets: list[str], figures: dict[str, str],
) -> str:  # fmt: skip
    """summary.md: notices, one table per facet, how to read, figures, statistics."""
    facets = facet_keys(records)
    preset = info.get("preset") or ", ".join(sorted(set(records["preset"].dropna().astype(str))))
    lines = [f"# Gradient-leakage report: preset `{preset or 'unknown'}`", ""]
    for notice in info.get("notices") or []:
        lines += [f"> **Note:** {notice}", ""]
    lines += [
        f"{records['cell_id'].nunique()} cells, {len(records)} attacked images "
        f"(datasets: {', '.join(datasets)}). Success rule: {_rule_text(rule)}.",
        "",
    ]
    table = format_table(summary, facets, DASH["md"])
    for values, idx in _facet_groups(summary, facets):
        lines += [f"## {facet_label(values)}", ""]
        origins = records.loc[records["dataset"] == values["dataset"], "dataset_origin"].dropna()
        origins = sorted(set(origins.astype(str)))
        if origins:
            lines += [f"Images: {'; '.join(origins)}", ""]
        lines += [_markdown(table.loc[idx].drop(columns=facets)), ""]
    lines += _how_to_read(rule) + _figure_links(figures) + _footer(records)
    return "\n".join(lines).rstrip() + "\n"


def _facet_groups(summary: pd.DataFrame, facets: list[str]) -> list[tuple[dict, list[int]]]:
    """(facet values, summary row indices) in summary order."""
    groups: dict[tuple, list[int]] = {}
    for i, values in enumerate(summary[facets].itertuples(index=False, name=None)):
        groups.setdefault(values, []).append(i)
    return [(dict(zip(facets, k)), idx) for k, idx in groups.items()]


def _how_to_read(rule: SuccessRule | None) -> list[str]:
    return [
        "## How to read",
        "",
        "Each row is one defense setting; each attacked victim image counts once per seed. "
        f"{_capitalized(_direction_words('ssim'))} and {_direction_words('mse')} mean the "
        "reconstruction is closer to the private image: more leakage, i.e. a weaker defense. "
        f"*success* counts images where the attack met the preset's rule {_rule_text(rule)}. "
        "*diverged* counts attacks whose optimisation blew up; they are scored like any other "
        "(NaN pixels as mid-grey) and are kept in every statistic.",
        "",
    ]


def _figure_links(figures: dict[str, str]) -> list[str]:
    lines = ["## Figures", ""]
    for title, stem in figures.items():
        lines += [f"![{title}]({stem}.png)", "", f"{title}: [PNG]({stem}.png), [PDF]({stem}.pdf)", ""]
    lines += [
        "Tables: [CSV](tables/leakage.csv), [LaTeX](tables/leakage.tex), "
        "[Markdown](tables/leakage.md); every attacked image: [records.csv](records.csv).",
        "",
    ]
    return lines


def _footer(records: pd.DataFrame) -> list[str]:
    pct = f"{100 * CONFIDENCE:.0f} %"
    provenance = "; ".join(
        f"{k} {', '.join(sorted(set(records[k].dropna().astype(str))))}"
        for k in ("torch", "torchvision", "python", "git_rev", "device", "engine")
        if records[k].notna().any()
    )
    return [
        "---",
        "",
        f"**Statistics.** Per dataset and defense setting over victim images × seeds (n rows). "
        f"Success rate: {pct} Wilson score interval, in percent. Mean SSIM and mean MSE: {pct} "
        f"Student-t interval, mean ± t(0.975, n−1)·s/√n (scipy.stats.t), clipped to the metric's "
        f"range (SSIM [−1, 1], MSE [0, 1]); n = 1 gives no interval ({DASH['md']}). Median MSE: "
        "sample median. The same images, model weights and dummy initialisations face every "
        "defense of a dataset (paired design), so the intervals describe each row, not the "
        "difference between rows. The reconstruction figure shows slot 0 of the first victim "
        "batch (lowest seed) of each cell, next to the reconstruction matched to it.",
        "",
        f"**Provenance.** {provenance}." if provenance else "",
    ]


# ------------------------------------------------------------------------- figures


def figure_style(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's matplotlib style: seaborn whitegrid/paper, then ``overrides`` (default :data:`STYLE`)."""
    extra = STYLE if overrides is None else overrides
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"), **extra}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _palette(summary: pd.DataFrame, family: str) -> dict[str, tuple]:
    """Colours of a family's defenses, the same in every column."""
    names = sorted(set(summary.loc[summary["family"] == family, "defense"].astype(str)),
                   key=lambda n: (_rank(n, DEFENSE_ORDER), n))
    return dict(zip(names, sns.color_palette("colorblind", max(len(names), 1))))


def _strength_families(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(family, parameter) pairs that have a strength, in report order."""
    rows = summary.loc[summary["parameter"].notna(), ["family", "parameter"]].drop_duplicates()
    pairs = [(str(f), str(p)) for f, p in rows.itertuples(index=False, name=None)]
    return sorted(dict.fromkeys(pairs), key=lambda fp: (_rank(fp[0], FAMILY_ORDER), fp))


def _errorbar(ax: Axes, x: Sequence[float], rows: pd.DataFrame, color: tuple, label: str) -> None:
    y = rows["ssim_mean"].to_numpy(dtype=float)
    err = np.nan_to_num(np.vstack([y - rows["ssim_lo"], rows["ssim_hi"] - y]), nan=0.0)
    ax.errorbar(x, y, yerr=err, color=color, label=label, marker="o", ms=4, lw=1.4, capsize=3, zorder=3)


def _strength_panel(
    ax: Axes, rows: pd.DataFrame, parameter: str, baseline: float, palette: dict
) -> None:
    label, kind = STRENGTH_AXES.get(parameter, (parameter, "linear"))
    if rows.empty:
        _blank_panel(ax, "not run")
    elif kind == "categorical":
        order = order_settings(rows)
        for defense, sub in rows.groupby("defense", sort=False):
            _errorbar(ax, [order.index(v) for v in sub["defense_label"]], sub, palette[defense], defense)
        first = rows.drop_duplicates("defense_label").set_index("defense_label")["strength"]
        ax.set_xticks(range(len(order)), [f"{v}\n{first[v]:g} bits" for v in order])
        ax.set_xlim(-0.5, len(order) - 0.5)
    else:
        for defense, sub in rows.groupby("defense", sort=False):
            sub = sub.sort_values("strength")
            _errorbar(ax, sub["strength"].to_numpy(dtype=float), sub, palette[defense], defense)
        ax.set_xscale("log" if kind == "log" else "linear")
    if not math.isnan(baseline):
        ax.axhline(baseline, ls="--", lw=1, color="0.35", label="no defense", zorder=2)
    ax.set_xlabel(label)


def _blank_panel(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])


def _strength_column(axes: Sequence[Axes], part: pd.DataFrame, families: list[tuple[str, str]],
                     palettes: dict[str, dict]) -> None:  # fmt: skip
    """One facet's panels, one per family (a blank panel if no family has a strength)."""
    if not families:
        _blank_panel(axes[0], "no defense with a\nstrength was run")
        axes[0].set_yticks([])
        return
    none = part.loc[part["family"] == "none", "ssim_mean"]
    baseline = float(none.iloc[0]) if len(none) else math.nan
    for ax, (family, parameter) in zip(axes, families):
        _strength_panel(ax, part[part["family"] == family], parameter, baseline, palettes[family])


def _row_legend(row: Sequence[Axes]) -> None:
    """One legend right of the row's last panel, with the entries of all its panels."""
    entries: dict[str, Any] = {}
    for ax in row:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        row[-1].legend(entries.values(), entries.keys(), loc="upper left", bbox_to_anchor=(1.02, 1),
                       frameon=False)  # fmt: skip


def plot_leakage_vs_strength(summary: pd.DataFrame, facets: list[str]) -> Figure:
    """Mean SSIM (95 % CI) vs strength: rows = defense families, columns = facets."""
    families = _strength_families(summary)
    palettes = {family: _palette(summary, family) for family, _ in families}
    groups = _facet_groups(summary, facets)
    nrows = max(len(families), 1)
    with matplotlib.rc_context(figure_style()):
        fig = new_figure(PANEL_IN[0] * len(groups) + 1.2, PANEL_IN[1] * nrows + 0.7)
        axes = fig.subplots(nrows, len(groups), squeeze=False, sharey=True)
        for c, (values, idx) in enumerate(groups):
            _strength_column(axes[:, c], summary.loc[idx], families, palettes)
            axes[0][c].set_title(facet_label(values))
        for r, (family, _) in enumerate(families):
            axes[r][0].set_ylabel(f"{family}\nmean SSIM (95 % CI)")
            _row_legend(axes[r])
        fig.suptitle(
            f"Leakage vs defense strength\n({_direction_words('ssim')} = more leakage; dashed: no defense)"
        )
    return fig


def _first_lanes(records: pd.DataFrame, arrays: CellArrays, facets: list[str]) -> dict[tuple, dict[str, tuple]]:
    """facet values -> defense label -> (first row, original, reconstruction) of its cell.

    The cell is the lowest-seed one whose NPZ is readable (ties: lowest cell id);
    its first row is lane 0, slot 0.
    """
    firsts = records.groupby("cell_id", sort=False).head(1)
    firsts = firsts.sort_values(["seed", "cell_id"], kind="stable")
    out: dict[tuple, dict[str, tuple]] = {}
    for _, row in firsts.iterrows():
        chosen = out.setdefault(tuple(row[k] for k in facets), {})
        if row["defense_label"] not in chosen:
            pair = _lane0_images(arrays.get(str(row["cell_id"])))
            if pair is not None:
                chosen[row["defense_label"]] = (row, *pair)
    return out


def _lane0_images(arrays: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(original, matched reconstruction) of slot 0 of lane 0, uint8 [C,H,W]; None if missing."""
    if not arrays or "originals" not in arrays or "reconstructions" not in arrays:
        return None
    orig, rec = arrays["originals"][0], arrays["reconstructions"][0]
    perm = match_reconstructions(orig / 255.0, rec / 255.0)
    return orig[0], rec[perm[0]]


def _hwc(image: np.ndarray) -> np.ndarray:
    hwc = np.moveaxis(np.asarray(image, dtype=np.uint8), 0, -1)
    return np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc


def image_tile(ax: Axes, image: np.ndarray | None, caption: str = "", fontsize: float = 8) -> None:
    """One image (uint8 [C, H, W]) in a bare axes, caption below; blank axes for None."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if image is not None:
        ax.imshow(_hwc(image), interpolation="nearest")
    if caption:
        ax.set_xlabel(caption, fontsize=fontsize, labelpad=2)


def plot_reconstructions(records: pd.DataFrame, arrays: CellArrays, facets: list[str],
                         datasets: list[str]) -> Figure:  # fmt: skip
    """Grid: columns = facets, rows = original then each defense setting; blanks where missing."""
    settings = order_settings(records)
    lanes = _first_lanes(records, arrays, facets)
    keys = sorted(lanes, key=lambda k: _facet_sort_key(k, facets, datasets))
    with matplotlib.rc_context(figure_style()):
        fig = new_figure(LABEL_IN + 1.1 * TILE_IN * len(keys), 0.6 + 1.25 * TILE_IN * (len(settings) + 1))
        axes = fig.subplots(len(settings) + 1, len(keys), squeeze=False)
        for c, key in enumerate(keys):
            shown = lanes[key]
            source = next((shown[lab] for lab in settings if lab in shown), None)
            original = source[1] if source else None
            image_tile(axes[0][c], original, f"image {source[0]['image']}" if source else "")
            axes[0][c].set_title(facet_label(dict(zip(facets, key))))
            for r, lab in enumerate(settings, start=1):
                row, _, rec = shown.get(lab, (None, None, None))
                image_tile(axes[r][c], rec, f"SSIM {row['ssim']:.2f}" if row is not None else "")
        for r, lab in enumerate(["original", *settings]):
            axes[r][0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=9)
        fig.suptitle("Reconstructions (first victim image)")
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    meta = PNG_META if fmt == "png" else PDF_META
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta, facecolor="white")
    return buf.getvalue()


# -------------------------------------------------------------------------- report


def write_report(out: Path) -> list[Path]:
    """Write records.csv, summary.md, tables/ and figures/ under ``out``; return the paths."""
    out = Path(out)
    records = load_records(out)
    arrays = CellArrays(out)
    info = read_run_info(out)
    rule = _success_rule(info, out)
    datasets = dataset_order(records, info)
    facets = facet_keys(records)
    summary = summarize(records, datasets)
    figures = {
        "Leakage vs defense strength": "figures/leakage_vs_strength",
        "Reconstructions": "figures/reconstructions",
    }
    files: dict[str, bytes] = {
        "records.csv": records.to_csv(index=False, lineterminator="\n").encode(),
        "summary.md": render_summary(records, summary, info, rule, datasets, figures).encode(),
        "tables/leakage.md": (_markdown(format_table(summary, facets, DASH["md"])) + "\n").encode(),
        "tables/leakage.tex": _latex(format_table(summary, facets, DASH["tex"]), rule).encode(),
        "tables/leakage.csv": summary.to_csv(index=False, lineterminator="\n").encode(),
    }
    plots = {
        figures["Leakage vs defense strength"]: plot_leakage_vs_strength(summary, facets),
        figures["Reconstructions"]: plot_reconstructions(records, arrays, facets, datasets),
    }
    if _cell_files(out):  # else the bundle is this report's input, kept as it is
        bundle = figure_arrays(records, arrays)
        if bundle is not None:
            files[FIGURE_ARRAYS] = bundle
    for stem, fig in plots.items():
        for fmt in ("png", "pdf"):
            files[f"{stem}.{fmt}"] = figure_bytes(fig, fmt)
    written = []
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    return written
