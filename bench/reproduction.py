"""Paper reproduction: the DLG paper's defense claims, checked against a results store.

:func:`write_reproduction` writes, under ``out/``:

* ``figures/iterations.{png,pdf}``: the undefended attack's iterate at the snapshot
  steps, one image per dataset (only when the store holds ``snap_<step>`` arrays);
* ``figures/family_<family>.{png,pdf}``: per defense family, reconstructions at each
  strength and the gradient-match loss curves per strength;
* ``figures/tradeoff.{png,pdf}``: accuracy drop vs leakage per defense setting, with the
  Pareto frontier (needs accuracy rows);
* ``figures/batch_size.{png,pdf}``: victim batch size vs closures and SSIM (when the
  records hold several batch sizes);
* ``tables/paper_table.{md,tex,csv}`` and ``tables/weakest_defending.{md,tex,csv}``;
* ``REPRODUCTION.md``: each claim with its evidence, 95 % intervals and a verdict
  computed by the rules below (never written by hand).

Everything is a pure function of its inputs (same inputs, byte-identical files) and
written atomically. Figures use matplotlib's Agg canvas without metadata dates.

Rules (constants below):

* a defense setting **defends** on a dataset when the upper bound of the 95 % Wilson
  interval of its attack success rate is below :data:`DEFENDED_UPPER` (0.5): with 95 %
  confidence the attack recovers fewer than half of the images (0/4 and 0/8, 1/8
  qualify; 1/4 and 2/8 do not). Success is the preset's rule, as in the records.
  It is **not defended** when it does not defend and at least one attack succeeded,
  and **inconclusive** when no attack succeeded but n is too small to call it defended
  (n <= 3); inconclusive settings are left out of verdicts;
* claims about defenses are tested only on datasets where the undefended attack is
  *not defended*, i.e. where there is leakage to defend against;
* claims use one model and attack and each dataset's smallest victim batch size; records
  repeating an identical attack (same dataset, defense, B, seed, image, slot, lane seed;
  e.g. paper.toml and paper-batch.toml both attacking the first B = 1 images) count once;
* a setting **costs accuracy** when its mean accuracy drop against the undefended run
  with the same budget and seed is at least :data:`ACCURACY_TOLERANCE_PP` percentage
  points, or its training diverged; otherwise it **keeps accuracy**;
* per dataset, a claim over several settings *holds* when every setting behaves as
  claimed, *does not hold* when none does, and is *partly* true otherwise; across
  datasets the same rule combines the per-dataset verdicts (datasets where it was not
  measured are left out, and are listed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.metrics import match_reconstructions, parse_success
from bench.report import (
    CellArrays,
    figure_bytes,
    figure_style,
    format_interval,
    format_success,
    image_tile,
    new_figure,
    t_interval,
    wilson_interval,
)
from bench.store import atomic_write_bytes
from defenses import format_strength

__all__ = [
    "ACCURACY_TOLERANCE_PP",
    "DEFENDED_UPPER",
    "HOLDS",
    "NOT_HOLD",
    "NOT_MEASURED",
    "PARTLY",
    "Claim",
    "accuracy_summary",
    "evaluate_claims",
    "leakage_summary",
    "write_reproduction",
]

# ----------------------------------------------------------------------- thresholds

#: Defended: upper 95 % Wilson bound of the success rate below this.
DEFENDED_UPPER = 0.5
#: Costs accuracy: mean drop of at least this many percentage points (or diverged).
ACCURACY_TOLERANCE_PP = 1.0
#: Paper: noise defends from this variance on.
NOISE_BOUNDARY = 1e-2
NOISE_TEXT = "1e-2"
#: Paper: pruning defends above about this sparsity (percent).
PRUNE_BOUNDARY = 20.0
#: "High sparsity" for the compressed-training accuracy claim (percent).
HIGH_SPARSITY = 90.0
EASY_DATASET = "mnist"
FACE_DATASETS = ("lfw",)
CONFIDENCE = 0.95

HOLDS, NOT_HOLD, PARTLY, NOT_MEASURED = "holds", "does not hold", "partly", "not measured"
FAMILY_ORDER = ("none", "noise", "precision", "sparsity")
DEFENSE_ORDER = ("none", "gaussian", "laplacian", "fp16", "bf16", "int8", "prune")
SETTING_KEYS = ("family", "defense", "parameter", "strength", "defense_label")
#: Two records with these equal are the same attack (same image, model weights and dummy start).
DUPLICATE_KEYS = ("dataset", "model", "attack", "defense_label", "batch_size", "seed", "image", "slot", "lane_seed")
#: For which strength parameters a larger value is a stronger defense.
STRONGER_IS_LARGER = {"variance": True, "sparsity": True, "bits": False}

STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 9, "svg.hashsalt": "dlg-bench",
         "pdf.fonttype": 42}  # fmt: skip
TILE_IN = 0.8
LOSS_FLOOR = 1e-12


# ------------------------------------------------------------------------- helpers


def _rank(value: object, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _setting_key(family: object, defense: object, strength: object, label: object) -> tuple:
    s = _num(strength)
    return (_rank(family, FAMILY_ORDER), str(family), _rank(defense, DEFENSE_ORDER), str(defense),
            -math.inf if math.isnan(s) else s, str(label))  # fmt: skip


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}"


def combine(verdicts: Sequence[str]) -> str:
    """Verdict over datasets (or settings): all hold -> holds, none -> does not hold, else partly."""
    measured = [v for v in verdicts if v != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    if all(v == HOLDS for v in measured):
        return HOLDS
    if all(v == NOT_HOLD for v in measured):
        return NOT_HOLD
    return PARTLY


def _fraction_verdict(ok: Sequence[bool]) -> str:
    if not ok:
        return NOT_MEASURED
    return HOLDS if all(ok) else NOT_HOLD if not any(ok) else PARTLY


# ---------------------------------------------------------------------- statistics


def _dedupe(records: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Drop records that repeat an identical attack stored by another cell (first kept)."""
    same = [k for k in DUPLICATE_KEYS if k in records and records[k].notna().any()]
    if "image" not in same:
        return records, []
    dup = records.duplicated(subset=same, keep="first")
    if not dup.any():
        return records, []
    note = (f"Dropped {int(dup.sum())} records that repeat an identical attack stored by another cell (same image, "
            "model weights and start, e.g. the B = 1 undefended images of paper-batch.toml that paper.toml also "
            "attacked), so no attack counts twice.")  # fmt: skip
    return records[~dup].reset_index(drop=True), [note]


def _scope(records: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The records the claims use: one model and attack, each dataset's smallest batch size."""
    notes: list[str] = []
    r = records.copy()
    for key in ("model", "attack"):
        values = sorted(set(r[key].dropna().astype(str))) if key in r else []
        if len(values) > 1:
            notes.append(f"The records hold several {key}s ({', '.join(values)}); the claims and tables use "
                         f"{values[0]} only.")  # fmt: skip
            r = r[r[key].astype(str) == values[0]]
    if "batch_size" in r and r["batch_size"].notna().any():
        smallest = r.groupby("dataset")["batch_size"].transform("min")
        if (r["batch_size"] != smallest).any():
            sizes = ", ".join(f"{d}: B={int(b)}" for d, b in r.groupby("dataset")["batch_size"].min().items())
            notes.append(f"Claims and tables use each dataset's smallest victim batch size ({sizes}); the other "
                         "batch sizes appear only in figures/batch_size.")  # fmt: skip
        r = r[r["batch_size"] == smallest]
    return r.reset_index(drop=True), notes


def _mean_ci(values: np.ndarray, low: float = -math.inf, high: float = math.inf) -> tuple[float, float, float]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = t_interval(v)
    lo = lo if math.isnan(lo) else max(lo, low)
    hi = hi if math.isnan(hi) else min(hi, high)
    return float(v.mean()), lo, hi


def leakage_summary(records: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, defense setting) of the scoped records: success (Wilson), SSIM and closures (t), defended."""
    groups = records.groupby(["dataset", *SETTING_KEYS], dropna=False, sort=False)
    rows = []
    for key, g in groups:
        n = len(g)
        success = g["success"].fillna(False).astype(bool).to_numpy()
        wins = int(success.sum())
        lo, hi = wilson_interval(wins, n)
        ssim = _mean_ci(g["ssim"].to_numpy(dtype=float), -1.0, 1.0)
        closures = g["closures"].to_numpy(dtype=float) if "closures" in g else np.full(n, np.nan)
        won = closures[success]
        c_mean, c_lo, c_hi = _mean_ci(won, 0.0)
        rows.append({
            **dict(zip(["dataset", *SETTING_KEYS], key)), "n": n, "successes": wins, "success_rate": wins / n,
            "success_lo": lo, "success_hi": hi, "ssim_mean": ssim[0], "ssim_lo": ssim[1], "ssim_hi": ssim[2],
            "closures_n": int(won.size), "closures_mean": c_mean, "closures_lo": c_lo, "closures_hi": c_hi,
            "closures_median": float(np.median(won)) if won.size else math.nan,
            "defended": bool(hi < DEFENDED_UPPER),
            "outcome": "defended" if hi < DEFENDED_UPPER else "leaks" if wins else "inconclusive",
        })  # fmt: skip
    cols = ["dataset", *SETTING_KEYS, "n", "successes", "success_rate", "success_lo", "success_hi", "ssim_mean",
            "ssim_lo", "ssim_hi", "closures_n", "closures_mean", "closures_lo", "closures_hi", "closures_median",
            "defended", "outcome"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _budget_keys(frame: pd.DataFrame) -> list[str]:
    from bench.accuracy import BUDGET_KEYS

    return [k for k in BUDGET_KEYS if k in frame]


def _budget_text(row: Any) -> str:
    get = row.get if isinstance(row, dict) else (lambda k, d=None: getattr(row, k, d))
    limit = get("train_limit")
    cap = "" if limit is None or (isinstance(limit, float) and math.isnan(limit)) else f", train_limit {int(limit)}"
    return (f"{get('model')}, {int(get('epochs'))} epochs, batch {int(get('batch_size'))} split over "
            f"K={int(get('workers'))} workers, SGD lr {get('lr'):g} (cosine), momentum {get('momentum'):g}, "
            f"weight decay {get('weight_decay'):g}, augment {'on' if bool(get('augment')) else 'off'}{cap}")


def _scope_accuracy(accuracy: pd.DataFrame | None) -> tuple[pd.DataFrame, list[str]]:
    """Rows of one training budget (the most common one when the store holds several)."""
    if accuracy is None or len(accuracy) == 0:
        return pd.DataFrame(), []
    keys = _budget_keys(accuracy)
    sig = pd.Series(["|".join(map(str, row)) for row in accuracy[keys].itertuples(index=False, name=None)],
                    index=accuracy.index)
    counts = sig.value_counts()
    if len(counts) <= 1:
        return accuracy.reset_index(drop=True), []
    best = sorted(counts.index, key=lambda s: (-counts[s], s))[0]
    kept = accuracy[sig == best].reset_index(drop=True)
    note = (f"The accuracy results hold {len(counts)} training budgets; the claims use the most common one "
            f"({_budget_text(kept.iloc[0].to_dict())}).")  # fmt: skip
    return kept, [note]


def accuracy_summary(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, defense setting): accuracy and drop (percentage points) over seeds, with 95 % intervals.

    Two or more seeds: Student-t over seeds (the drop paired by seed). One seed: the
    accuracy's Wilson interval over the test images (test-set sampling only), no drop interval.
    """
    cols = ["dataset", *SETTING_KEYS, "seeds", "test_images", "accuracy", "accuracy_lo", "accuracy_hi",
            "accuracy_ci", "drop_pp", "drop_lo", "drop_hi", "diverged", "split"]  # fmt: skip
    if accuracy is None or len(accuracy) == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in accuracy.groupby(["dataset", *SETTING_KEYS], dropna=False, sort=False):
        acc = g["test_accuracy"].to_numpy(dtype=float)
        n_test = int(g["test_images"].iloc[0])
        if len(g) >= 2:
            mean, lo, hi = _mean_ci(acc, 0.0, 1.0)
            how = "t over seeds"
        else:
            mean = float(acc[0])
            lo, hi = wilson_interval(round(mean * n_test), n_test)
            how = "Wilson over test images"
        drop = 100 * g["drop"].to_numpy(dtype=float)
        d_mean, d_lo, d_hi = _mean_ci(drop)
        rows.append({
            **dict(zip(["dataset", *SETTING_KEYS], key)), "seeds": len(g), "test_images": n_test, "accuracy": mean,
            "accuracy_lo": lo, "accuracy_hi": hi, "accuracy_ci": how, "drop_pp": d_mean, "drop_lo": d_lo,
            "drop_hi": d_hi, "diverged": int(g["diverged"].fillna(False).astype(bool).sum()),
            "split": str(g["split"].iloc[0]),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _costs(row: Any) -> bool:
    return bool(row["diverged"]) or (not math.isnan(row["drop_pp"]) and row["drop_pp"] >= ACCURACY_TOLERANCE_PP)


# -------------------------------------------------------------------------- claims


@dataclass
class DatasetResult:
    dataset: str
    verdict: str
    lines: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class Claim:
    key: str
    title: str
    paper: str
    test: str
    results: list[DatasetResult]
    verdict: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.verdict:
            self.verdict = combine([r.verdict for r in self.results])
        if not self.summary:
            self.summary = _summary_sentence(self.results)


def _summary_sentence(results: Sequence[DatasetResult]) -> str:
    by: dict[str, list[str]] = {}
    for r in results:
        by.setdefault(r.verdict, []).append(r.dataset)
    parts = [f"{v} on {', '.join(by[v])}" for v in (HOLDS, PARTLY, NOT_HOLD, NOT_MEASURED) if v in by]
    return "; ".join(parts) + "." if parts else "no data."


def _leak_line(r: Any) -> str:
    ci = f"{100 * CONFIDENCE:.0f} % CI"
    succ = format_success(int(r["successes"]), int(r["n"]), r["success_lo"], r["success_hi"])
    ssim = format_interval(r["ssim_mean"], r["ssim_lo"], r["ssim_hi"], ".3f")
    outcome = {"defended": "defended", "leaks": "not defended",
               "inconclusive": "inconclusive (no success, too few images to call it defended)"}[r["outcome"]]
    return f"{r['defense_label']}: success {succ}, mean SSIM {ssim} ({ci}, n = {int(r['n'])}) → {outcome}"


def _acc_line(r: Any) -> str:
    acc = f"{_pct(r['accuracy'])} % [{_pct(r['accuracy_lo'])}, {_pct(r['accuracy_hi'])}]"
    if math.isnan(r["drop_pp"]):
        drop = "drop — (no undefended run)"
    elif math.isnan(r["drop_lo"]):
        drop = f"drop {r['drop_pp']:+.1f} pp [—]"
    else:
        drop = f"drop {r['drop_pp']:+.1f} pp [{r['drop_lo']:+.1f}, {r['drop_hi']:+.1f}]"
    div = f", {int(r['diverged'])} diverged" if r["diverged"] else ""
    return (f"{r['defense_label']}: accuracy {acc} ({r['accuracy_ci']}, {int(r['seeds'])} seed(s)), {drop}{div} → "
            f"{'costs accuracy' if _costs(r) else 'keeps accuracy'}")  # fmt: skip


def _baseline(leak: pd.DataFrame, dataset: str) -> tuple[bool, str]:
    """Whether the undefended attack leaks on ``dataset`` (else defense claims cannot be tested)."""
    none = leak[(leak["dataset"] == dataset) & (leak["defense"] == "none")]
    if none.empty:
        return False, "no undefended (none) cell, so there is no leakage baseline"
    r = none.iloc[0]
    if r["outcome"] != "leaks":
        return False, (f"the undefended attack itself does not leak here (success {_success_text(r)}: "
                       f"{r['outcome']}), so no defense can be shown to matter")  # fmt: skip
    return True, ""


def _defense_claim(leak: pd.DataFrame, datasets: Sequence[str], select: Callable[[pd.DataFrame], pd.DataFrame],
                   expect: Callable[[Any], bool | None], expect_text: Callable[[Any], str],
                   need: Callable[[pd.DataFrame], str],
                   verdict: Callable[[list[tuple[bool, bool]]], str] | None = None) -> list[DatasetResult]:  # fmt: skip
    """Per dataset: rows from ``select``; each counts where ``expect(row)`` (True: defends, False: does not,
    None: context only) matches the measured outcome. ``need(rows)`` returns why it is not measured, or ''.
    ``verdict`` maps the (expected, measured) pairs to a verdict (default: all match / none / some)."""
    out = []
    for d in datasets:
        rows = select(leak[leak["dataset"] == d])
        missing = need(rows)
        if missing:
            out.append(DatasetResult(d, NOT_MEASURED, reason=missing))
            continue
        leaks, why = _baseline(leak, d)
        if not leaks:
            out.append(DatasetResult(d, NOT_MEASURED, reason=why))
            continue
        pairs, lines = [], []
        for _, r in rows.iterrows():
            e = expect(r)
            line = _leak_line(r)
            if e is None or r["outcome"] == "inconclusive":
                lines.append(f"{line} (context)" if e is None else f"{line}; left out of the verdict")
            else:
                pairs.append((e, bool(r["defended"])))
                lines.append(f"{line}; claim expects {expect_text(r)}: {'✓' if e == r['defended'] else '✗'}")
        if not pairs:
            out.append(DatasetResult(d, NOT_MEASURED, lines, "every tested setting is inconclusive"))
            continue
        rule = verdict or (lambda ps: _fraction_verdict([e == m for e, m in ps]))
        out.append(DatasetResult(d, rule(pairs), lines))
    return out


def _threshold_verdict(pairs: list[tuple[bool, bool]]) -> str:
    """'Defends only from a boundary on': holds if every setting matches; does not hold if no setting that
    should defend does; partly otherwise (e.g. it defends, but also below the boundary)."""
    if not pairs:
        return NOT_MEASURED
    if all(e == m for e, m in pairs):
        return HOLDS
    if not any(m for e, m in pairs if e):
        return NOT_HOLD
    return PARTLY


def _accuracy_claim(acc: pd.DataFrame, datasets: Sequence[str], select: Callable[[pd.DataFrame], pd.DataFrame],
                    expect_cost: Callable[[Any], bool | None], need: Callable[[pd.DataFrame], str],
                    no_rows: str) -> list[DatasetResult]:  # fmt: skip
    out = []
    if acc.empty:
        return [DatasetResult("(all)", NOT_MEASURED, reason=no_rows)]
    for d in datasets:
        rows = select(acc[acc["dataset"] == d])
        missing = need(rows)
        if missing:
            out.append(DatasetResult(d, NOT_MEASURED, reason=missing))
            continue
        if rows["drop_pp"].isna().all():
            out.append(DatasetResult(d, NOT_MEASURED, reason="no undefended training run to compare with"))
            continue
        ok, lines = [], []
        for _, r in rows.iterrows():
            e = expect_cost(r)
            line = _acc_line(r)
            if e is None or math.isnan(r["drop_pp"]):
                lines.append(f"{line} (context)")
            else:
                match = e == _costs(r)
                ok.append(match)
                lines.append(f"{line}; claim expects {'a cost' if e else 'no cost'}: {'✓' if match else '✗'}")
        out.append(DatasetResult(d, _fraction_verdict(ok), lines))
    return out


def _family(rows: pd.DataFrame, family: str) -> pd.DataFrame:
    return rows[rows["family"] == family]


def _need_both_sides(boundary: float, text: str, what: str) -> Callable[[pd.DataFrame], str]:
    def need(rows: pd.DataFrame) -> str:
        s = rows["strength"].astype(float)
        if rows.empty:
            return f"no {what} setting was run"
        if not (s < boundary).any() or not (s >= boundary).any():
            have = ", ".join(format_strength(v, scientific=True) for v in s)
            return f"needs {what} settings on both sides of {text} (have {have})"
        return ""

    return need


def _need_any(pred: Callable[[pd.DataFrame], pd.Series], what: str) -> Callable[[pd.DataFrame], str]:
    return lambda rows: "" if (not rows.empty and pred(rows).any()) else f"no {what} was run"


def _weakest_note(leak: pd.DataFrame, dataset: str, family: str) -> str:
    rows = leak[(leak["dataset"] == dataset) & (leak["family"] == family)]
    parts = []
    for defense, g in rows.groupby("defense", sort=False):
        w = _weakest(g)
        parts.append(f"{defense}: {w[0]}" if w else f"{defense}: none of {len(g)} settings defends")
    return "Weakest defending strength: " + "; ".join(parts) + "." if parts else ""


def _weakest(rows: pd.DataFrame) -> tuple[str, Any] | None:
    """(label, row) of the weakest setting that defends, or None."""
    d = rows[rows["defended"]]
    if d.empty:
        return None
    param = str(rows["parameter"].iloc[0])
    larger = STRONGER_IS_LARGER.get(param, True)
    r = d.sort_values("strength", ascending=larger, kind="stable").iloc[0]
    return str(r["defense_label"]), r


def evaluate_claims(leak: pd.DataFrame, acc: pd.DataFrame, datasets: Sequence[str],
                    acc_datasets: Sequence[str]) -> list[Claim]:  # fmt: skip
    """The paper's claims with per-dataset evidence and computed verdicts."""
    no_acc = "no accuracy results (run the preset's [training] jobs)"
    claims = []

    res = _defense_claim(
        leak, datasets, lambda r: _family(r, "noise"),
        lambda r: float(r["strength"]) >= NOISE_BOUNDARY,
        lambda r: "defended" if float(r["strength"]) >= NOISE_BOUNDARY else "not defended",
        _need_both_sides(NOISE_BOUNDARY, NOISE_TEXT, "noise"), _threshold_verdict)
    for r in res:
        if r.verdict != NOT_MEASURED:
            r.lines.append(_weakest_note(leak, r.dataset, "noise"))
    claims.append(Claim(
        "1", "Noise defends only at variance ≥ 1e-2",
        "Gaussian and Laplacian noise with variance 1e-4 or 1e-3 do not prevent the leak; from 1e-2 on the "
        "reconstruction fails.",
        f"each noise setting defends iff its variance ≥ {NOISE_TEXT}: all match: holds; no setting at "
        f"≥ {NOISE_TEXT} defends: does not hold; otherwise partly.", res))

    res = _accuracy_claim(
        acc, acc_datasets, lambda r: _family(r, "noise"),
        lambda r: True if float(r["strength"]) >= NOISE_BOUNDARY else None,
        _need_any(lambda r: r["strength"].astype(float) >= NOISE_BOUNDARY,
                  f"noise setting with variance ≥ {NOISE_TEXT}"), no_acc)  # fmt: skip
    claims.append(Claim(
        "2", "Noise at variance ≥ 1e-2 costs accuracy",
        "The noise levels that defend degrade the trained model's accuracy.",
        f"every noise setting with variance ≥ {NOISE_TEXT} costs accuracy (drop ≥ "
        f"{ACCURACY_TOLERANCE_PP:g} pp or diverged); weaker settings are shown as context.", res))

    res = _defense_claim(
        leak, datasets, lambda r: r[r["defense"].isin(["fp16", "bf16"])],
        lambda r: False, lambda r: "not defended",
        lambda rows: "" if not rows.empty else "neither fp16 nor bf16 was run")
    claims.append(Claim(
        "3", "fp16 and bf16 do not defend",
        "Half precision (fp16) and bfloat16 gradients leak as much as full precision.",
        "fp16 and bf16 each count as not defended.", res))

    res = _defense_claim(
        leak, datasets, lambda r: r[r["defense"] == "int8"], lambda r: True, lambda r: "defended",
        lambda rows: "" if not rows.empty else "int8 was not run")
    claims.append(Claim("4a", "int8 defends", "8-bit integer quantisation of the gradients prevents the leak.",
                        "int8 counts as defended.", res))
    res = _accuracy_claim(acc, acc_datasets, lambda r: r[r["defense"] == "int8"], lambda r: True,
                          lambda rows: "" if not rows.empty else "int8 was not trained", no_acc)
    claims.append(Claim("4b", "int8 costs accuracy", "int8 quantisation lowers the trained model's accuracy.",
                        f"int8 costs accuracy (drop ≥ {ACCURACY_TOLERANCE_PP:g} pp or diverged).", res))

    res = _defense_claim(
        leak, datasets, lambda r: _family(r, "sparsity"),
        lambda r: True if float(r["strength"]) > PRUNE_BOUNDARY else None, lambda r: "defended",
        _need_any(lambda r: r["strength"].astype(float) > PRUNE_BOUNDARY, f"pruning above {PRUNE_BOUNDARY:g} %"))
    for r in res:
        if r.verdict != NOT_MEASURED:
            r.lines.append(_weakest_note(leak, r.dataset, "sparsity"))
    claims.append(Claim(
        "5", "Pruning above ~20 % sparsity defends",
        "Pruning the smallest gradient entries defends once more than about 20 % of them are zeroed.",
        f"every pruning setting with sparsity > {PRUNE_BOUNDARY:g} % defends; weaker settings are shown as "
        "context.", res))

    res = _accuracy_claim(
        acc, acc_datasets, lambda r: _family(r, "sparsity"),
        lambda r: False if float(r["strength"]) >= HIGH_SPARSITY else None,
        _need_any(lambda r: r["strength"].astype(float) >= HIGH_SPARSITY, f"pruning at ≥ {HIGH_SPARSITY:g} % "
                  "sparsity"), no_acc)  # fmt: skip
    for r in res:
        if r.verdict != NOT_MEASURED:
            r.lines.append(_keeps_up_to(acc, r.dataset))
    claims.append(Claim(
        "6", "Pruning keeps accuracy at high sparsity",
        "Compressed training (Deep Gradient Compression) keeps accuracy up to 99 % sparsity.",
        f"every pruning setting with sparsity ≥ {HIGH_SPARSITY:g} % keeps accuracy (drop < "
        f"{ACCURACY_TOLERANCE_PP:g} pp, no divergence). Note: this suite prunes each worker's gradient plainly; "
        "DGC's momentum correction, local gradient accumulation and warm-up are not implemented, so the claim is "
        "tested for plain pruning.", res))

    claims.append(_easiest_claim(leak))
    claims.append(_faces_claim(leak))
    return claims


def _keeps_up_to(acc: pd.DataFrame, dataset: str) -> str:
    rows = acc[(acc["dataset"] == dataset) & (acc["family"] == "sparsity")].sort_values("strength")
    best = None
    for _, r in rows.iterrows():
        if math.isnan(r["drop_pp"]) or _costs(r):
            break
        best = float(r["strength"])
    return (f"Keeps accuracy at every measured sparsity up to {best:g} %." if best is not None
            else "Costs accuracy already at the lowest measured sparsity.")  # fmt: skip


def _undefended(leak: pd.DataFrame) -> pd.DataFrame:
    return leak[leak["defense"] == "none"].reset_index(drop=True)


def _success_text(r: Any) -> str:
    return format_success(int(r["successes"]), int(r["n"]), r["success_lo"], r["success_hi"])


def _closures_text(r: Any) -> str:
    if not r["closures_n"]:
        return "no successful attack"
    return (f"{format_interval(r['closures_mean'], r['closures_lo'], r['closures_hi'], '.0f')} "
            f"(median {r['closures_median']:.0f}, n = {int(r['closures_n'])} successful)")


def _easiest_claim(leak: pd.DataFrame) -> Claim:
    title = "MNIST is the easiest dataset to attack"
    paper = "MNIST images are recovered most easily (highest success, fewest iterations)."
    test = ("undefended attack: MNIST has the highest success rate of all datasets (ties count) and the fewest mean "
            "closures among successful attacks; both: holds, one: partly, neither: does not hold.")
    base = _undefended(leak)
    lines = [f"{r['dataset']}: success {_success_text(r)}, closures to converge {_closures_text(r)}"
             for _, r in base.iterrows()]
    if EASY_DATASET not in set(base["dataset"]):
        why = f"{EASY_DATASET} has no undefended cell in this run (datasets: {', '.join(base['dataset']) or 'none'})"
        return Claim("7a", title, paper, test, [DatasetResult("all datasets", NOT_MEASURED, lines, why)])
    if len(base) < 2:
        return Claim("7a", title, paper, test, [DatasetResult("all datasets", NOT_MEASURED, lines,
                                                              "needs at least two datasets")])
    if not base["successes"].any():
        return Claim("7a", title, paper, test, [DatasetResult("all datasets", NOT_MEASURED, lines,
                                                              "no undefended attack succeeded on any dataset")])
    m = base[base["dataset"] == EASY_DATASET].iloc[0]
    others = base[base["dataset"] != EASY_DATASET]
    checks = [bool(m["success_rate"] >= others["success_rate"].max())]
    lines.append(f"highest success rate: {'✓' if checks[0] else '✗'}")
    with_c = others[others["closures_n"] > 0]
    if m["closures_n"] and not with_c.empty:
        checks.append(bool(m["closures_mean"] <= with_c["closures_mean"].min()))
        lines.append(f"fewest mean closures among successful attacks: {'✓' if checks[1] else '✗'}")
    else:
        lines.append("fewest closures: not comparable (needs successful attacks on MNIST and another dataset)")
    return Claim("7a", title, paper, test, [DatasetResult("all datasets", _fraction_verdict(checks), lines)])


def _faces_claim(leak: pd.DataFrame) -> Claim:
    title = "Faces (LFW) need more iterations"
    paper = "Face images need more optimisation iterations to be recovered than the other datasets."
    test = ("undefended attack: mean closures to converge among successful attacks on lfw exceed those of every "
            "other dataset (holds), of some (partly) or of none (does not hold).")
    base = _undefended(leak)
    lines = [f"{r['dataset']}: closures to converge {_closures_text(r)}" for _, r in base.iterrows()]
    faces = base[base["dataset"].isin(FACE_DATASETS)]
    others = base[~base["dataset"].isin(FACE_DATASETS) & (base["closures_n"] > 0)]
    why = ""
    if faces.empty:
        why = f"no undefended cell on {', '.join(FACE_DATASETS)} in this run"
    elif not faces["closures_n"].iloc[0]:
        f = faces.iloc[0]
        why = (f"no successful undefended attack on lfw (success "
               f"{format_success(int(f['successes']), int(f['n']), f['success_lo'], f['success_hi'])}), so its "
               "closures to converge are censored at the step budget")  # fmt: skip
    elif others.empty:
        why = "no other dataset has a successful undefended attack to compare with"
    if why:
        return Claim("7b", title, paper, test, [DatasetResult("all datasets", NOT_MEASURED, lines, why)])
    f = faces.iloc[0]
    ok = [bool(f["closures_mean"] > r["closures_mean"]) for _, r in others.iterrows()]
    lines.append("lfw needs more than: " + ", ".join(f"{d} {'✓' if o else '✗'}" for d, o in zip(others["dataset"], ok)))
    return Claim("7b", title, paper, test, [DatasetResult("all datasets", _fraction_verdict(ok), lines)])


# -------------------------------------------------------------------------- tables


def _sorted(frame: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    keys = [(_rank(r.dataset, list(datasets)), str(r.dataset),
             *_setting_key(r.family, r.defense, r.strength, r.defense_label)) for r in frame.itertuples()]  # fmt: skip
    order = sorted(range(len(frame)), key=lambda i: keys[i])
    return frame.iloc[order].reset_index(drop=True)


def defended_rule_text() -> str:
    return (f"defended = upper bound of the 95 % Wilson interval of the attack success rate < {DEFENDED_UPPER:g}")


def paper_table(leak: pd.DataFrame, acc: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Numbers per (dataset, defense setting): outer join of leakage and accuracy."""
    key = ["dataset", "defense_label"]
    lcols = ["n", "successes", "success_rate", "success_lo", "success_hi", "ssim_mean", "ssim_lo", "ssim_hi",
             "defended", "outcome"]  # fmt: skip
    acols = ["seeds", "accuracy", "accuracy_lo", "accuracy_hi", "drop_pp", "drop_lo", "drop_hi", "diverged"]
    left = leak[[*key, "family", "defense", "parameter", "strength", *lcols]]
    if acc.empty:
        merged = left.copy()
        for c in acols:
            merged[c] = math.nan
    else:
        right = acc[[*key, "family", "defense", "parameter", "strength", *acols]]
        merged = left.merge(right, on=key, how="outer", suffixes=("", "_acc"))
        for c in ("family", "defense", "parameter", "strength"):
            merged[c] = merged[c].where(merged[c].notna(), merged[f"{c}_acc"])
            merged = merged.drop(columns=f"{c}_acc")
    merged["defended_rule"] = defended_rule_text()
    return _sorted(merged, datasets)[["dataset", "family", "defense", "parameter", "strength", "defense_label",
                                      *acols, *lcols, "defended_rule"]]  # fmt: skip


def _yes_no(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return "yes" if bool(v) else "no"


def _format_paper_table(t: pd.DataFrame, dash: str) -> pd.DataFrame:
    def acc(r: Any) -> str:
        if math.isnan(_num(r.accuracy)):
            return dash
        return f"{_pct(r.accuracy)} [{_pct(r.accuracy_lo)}, {_pct(r.accuracy_hi)}]"

    def drop(r: Any) -> str:
        if math.isnan(_num(r.drop_pp)):
            return dash
        ci = dash if math.isnan(_num(r.drop_lo)) else f"{r.drop_lo:+.1f}, {r.drop_hi:+.1f}"
        return f"{r.drop_pp:+.1f} [{ci}]"

    def succ(r: Any) -> str:
        return dash if math.isnan(_num(r.n)) else format_success(int(r.successes), int(r.n), r.success_lo,
                                                                   r.success_hi)  # fmt: skip

    def ssim(r: Any) -> str:
        return dash if math.isnan(_num(r.n)) else format_interval(r.ssim_mean, r.ssim_lo, r.ssim_hi, ".3f", dash)

    rows = list(t.itertuples())
    return pd.DataFrame({
        "dataset": [r.dataset for r in rows], "defense": [r.defense_label for r in rows],
        "accuracy % [95 % CI]": [acc(r) for r in rows], "drop pp [95 % CI]": [drop(r) for r in rows],
        "mean SSIM [95 % CI]": [ssim(r) for r in rows], "attack success [95 % CI]": [succ(r) for r in rows],
        "defended": [dash if math.isnan(_num(r.n)) else "inconclusive" if r.outcome == "inconclusive"
                     else _yes_no(r.defended) for r in rows],
    })  # fmt: skip


def weakest_table(leak: pd.DataFrame, acc: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    rows = []
    for (dataset, family, defense), g in leak[leak["family"] != "none"].groupby(["dataset", "family", "defense"],
                                                                                 sort=False):  # fmt: skip
        w = _weakest(g)
        param = str(g["parameter"].iloc[0])
        larger = STRONGER_IS_LARGER.get(param, True)
        strengths = ", ".join(format_strength(s, scientific=param == "variance")
                              for s in sorted(g["strength"].astype(float), reverse=not larger))
        row = {"dataset": dataset, "family": family, "defense": defense, "parameter": param,
               "measured": strengths, "weakest_defending": w[0] if w else "none defends",
               "strength": float(w[1]["strength"]) if w else math.nan, "success_rate": math.nan,
               "success_hi": math.nan, "ssim_mean": math.nan, "drop_pp": math.nan, "stronger_all_defend": None}
        if w:
            r = w[1]
            s = float(r["strength"])
            stronger = g[g["strength"].astype(float) >= s] if larger else g[g["strength"].astype(float) <= s]
            row.update(success_rate=float(r["success_rate"]), success_hi=float(r["success_hi"]),
                       ssim_mean=float(r["ssim_mean"]), stronger_all_defend=bool(stronger["defended"].all()))
            a = acc[(acc["dataset"] == dataset) & (acc["defense_label"] == r["defense_label"])] if not acc.empty \
                else acc  # fmt: skip
            if not a.empty:
                row["drop_pp"] = float(a["drop_pp"].iloc[0])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["dataset", "family", "defense", "parameter", "measured", "weakest_defending",
                                        "strength", "success_rate", "success_hi", "ssim_mean", "drop_pp",
                                        "stronger_all_defend"])  # fmt: skip
    if frame.empty:
        return frame
    frame["defended_rule"] = defended_rule_text()
    keys = [(_rank(r.dataset, list(datasets)), str(r.dataset), *_setting_key(r.family, r.defense, 0, ""))
            for r in frame.itertuples()]  # fmt: skip
    return frame.iloc[sorted(range(len(frame)), key=lambda i: keys[i])].reset_index(drop=True)


def _format_weakest(t: pd.DataFrame, dash: str) -> pd.DataFrame:
    rows = list(t.itertuples())

    def num(v: float, spec: str) -> str:
        return dash if math.isnan(_num(v)) else format(v, spec)

    return pd.DataFrame({
        "dataset": [r.dataset for r in rows], "family": [r.family for r in rows],
        "defense": [r.defense for r in rows], "strengths run": [r.measured for r in rows],
        "weakest defending": [r.weakest_defending for r in rows],
        "success there (%)": [dash if math.isnan(_num(r.success_rate)) else _pct(r.success_rate) for r in rows],
        "mean SSIM there": [num(r.ssim_mean, ".3f") for r in rows],
        "drop there (pp)": [num(r.drop_pp, "+.1f") for r in rows],
        "all stronger defend": [_yes_no(r.stronger_all_defend) for r in rows],
    })  # fmt: skip


TEXT_COLUMNS = ("dataset", "defense", "family", "strengths run", "weakest defending")


def _markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no rows)"
    align = ["left" if c in TEXT_COLUMNS else "right" for c in table]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def _latex(table: pd.DataFrame, caption: str, label: str) -> str:
    table = table.map(lambda v: str(v).replace("—", "--").replace("→", "->").replace("σ²", "variance"))
    table.columns = [str(c).replace("—", "--") for c in table.columns]
    return table.to_latex(index=False, escape=True, column_format="".join(
        "l" if c in TEXT_COLUMNS else "r" for c in table), caption=caption, label=label)


# ------------------------------------------------------------------------- figures


def _tile(ax: Axes, image: np.ndarray | None, caption: str = "") -> None:
    image_tile(ax, image, caption, fontsize=6)


def _first_cells(records: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(dataset, defense_label) -> cell id of the lowest-seed cell (ties: lowest id)."""
    firsts = records.groupby("cell_id", sort=False).head(1).sort_values(["seed", "cell_id"], kind="stable")
    out: dict[tuple[str, str], str] = {}
    for r in firsts.itertuples():
        out.setdefault((str(r.dataset), str(r.defense_label)), str(r.cell_id))
    return out


def _lane0(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(original, matched reconstruction, permutation) of lane 0, slot 0."""
    if "originals" not in arrays or "reconstructions" not in arrays:
        return None
    orig, rec = arrays["originals"][0], arrays["reconstructions"][0]
    perm = match_reconstructions(orig / 255.0, rec / 255.0)
    return orig[0], rec[perm[0]], perm


def plot_iterations(arrays_of: CellArrays, records: pd.DataFrame, datasets: Sequence[str]) -> Figure | None:
    """Undefended reconstruction at each snapshot step, original last; None without snapshots."""
    cells = _first_cells(records[records["defense"] == "none"])
    rows = []
    for d in datasets:
        cid = next((c for (ds, _), c in cells.items() if ds == d), None)
        arrays = arrays_of.get(cid) if cid else None
        if not arrays:
            continue
        steps = sorted(int(k[5:]) for k in arrays if k.startswith("snap_") and k[5:].isdigit())
        first = _lane0(arrays)
        if not steps or first is None:
            continue
        perm = first[2]
        rows.append((d, [(s, arrays[f"snap_{s}"][0][perm[0]]) for s in steps], first[0]))
    if not rows:
        return None
    ncols = max(len(r[1]) for r in rows) + 1
    with matplotlib.rc_context(figure_style(STYLE)):
        fig = new_figure(max(1.0 + TILE_IN * ncols, 4.0), 0.7 + 1.05 * TILE_IN * len(rows))
        axes = fig.subplots(len(rows), ncols, squeeze=False)
        for i, (d, snaps, orig) in enumerate(rows):
            for j in range(ncols):
                axes[i][j].set_visible(False)
            for j, (s, img) in enumerate(snaps):
                axes[i][j].set_visible(True)
                _tile(axes[i][j], img, f"step {s}")
            axes[i][-1].set_visible(True)
            _tile(axes[i][-1], orig, "original")
            axes[i][0].set_ylabel(d, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle("Undefended attack: reconstruction\nover L-BFGS steps (first victim image)")
    return fig


def _loss_curve(trace: np.ndarray) -> np.ndarray:
    """Median over lanes; a lane that stopped early keeps its last finite loss."""
    t = np.array(trace, dtype=np.float64, copy=True)
    t[~np.isfinite(t)] = np.nan
    for lane in t:
        last = math.nan
        for k in range(lane.size):
            if math.isnan(lane[k]):
                lane[k] = last
            else:
                last = lane[k]
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(np.isnan(t), np.nan, t), axis=0) if np.isfinite(t).any() else t[0]
    return np.clip(med, LOSS_FLOOR, None)


def plot_family(arrays_of: CellArrays, records: pd.DataFrame, family: str,
                datasets: Sequence[str]) -> Figure | None:  # fmt: skip
    """Reconstructions per strength (rows = datasets) and loss curves per strength (one panel per dataset)."""
    fam = records[records["family"] == family]
    if fam.empty:
        return None
    labels = _ordered_labels(fam)
    none_label = _ordered_labels(records[records["defense"] == "none"])
    columns = none_label[:1] + labels
    cells = _first_cells(records[records["defense_label"].isin(columns)])
    rows = [d for d in datasets if d in set(fam["dataset"])]
    palette = dict(zip(labels, sns.color_palette("viridis", len(labels))))
    ncols = len(columns) + 1
    with matplotlib.rc_context(figure_style(STYLE)):
        fig = new_figure(1.0 + TILE_IN * ncols + 3.4, 0.7 + max(1.05 * TILE_IN, 1.5) * len(rows))
        left, right = fig.subfigures(1, 2, width_ratios=[1.0 + TILE_IN * ncols, 3.4])
        tiles = left.subplots(len(rows), ncols, squeeze=False)
        curves = right.subplots(len(rows), 1, squeeze=False, sharex=True)
        for i, d in enumerate(rows):
            original = None
            for j, lab in enumerate(columns, start=1):
                cid = cells.get((d, lab))
                arrays = arrays_of.get(cid) if cid else None
                first = _lane0(arrays) if arrays else None
                if first is not None and original is None:
                    original = first[0]
                _tile(tiles[i][j], first[1] if first else None, "")
                if i == 0:
                    tiles[i][j].set_title(lab, fontsize=6, rotation=30, ha="left", va="bottom")
                ax = curves[i][0]
                trace = arrays.get("loss_trace") if arrays else None
                if trace is not None and trace.size:
                    y = _loss_curve(trace)
                    style = {"color": "0.3", "ls": "--"} if lab not in palette else {"color": palette[lab]}
                    ax.plot(np.arange(1, y.size + 1), y, lw=1.1, label=lab, **style)
            _tile(tiles[i][0], original, "")
            if i == 0:
                tiles[i][0].set_title("original", fontsize=6, rotation=30, ha="left", va="bottom")
            tiles[i][0].set_ylabel(d, rotation=0, ha="right", va="center", fontsize=8)
            ax = curves[i][0]
            ax.set_yscale("log")
            ax.set_ylabel(f"{d}\ngradient-match loss\n(median over images)")
            if i == len(rows) - 1:
                ax.set_xlabel("L-BFGS step")
        handles, names = curves[0][0].get_legend_handles_labels()
        if handles:
            curves[0][0].legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        fig.suptitle(f"Defense family '{family}': reconstructions (first victim image) and attack loss per strength")
    return fig


def _ordered_labels(frame: pd.DataFrame) -> list[str]:
    settings = frame.drop_duplicates("defense_label")
    keyed = sorted((_setting_key(r.family, r.defense, r.strength, r.defense_label), str(r.defense_label))
                   for r in settings.itertuples())  # fmt: skip
    return [lab for _, lab in keyed]


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats in both (lower x and lower y), by increasing x."""
    pts = sorted((float(a), float(b), i) for i, (a, b) in enumerate(zip(x, y)) if not (math.isnan(a) or math.isnan(b)))
    front, best = [], math.inf
    for a, b, i in pts:
        if b < best:
            front.append(i)
            best = b
    return front


def plot_tradeoff(leak: pd.DataFrame, acc: pd.DataFrame, datasets: Sequence[str]) -> Figure | None:
    if acc.empty:
        return None
    merged = leak.merge(acc[["dataset", "defense_label", "drop_pp"]], on=["dataset", "defense_label"])
    merged = merged[merged["drop_pp"].notna()]
    panels = [d for d in datasets if d in set(merged["dataset"])]
    if not panels:
        return None
    families = [f for f in FAMILY_ORDER if f in set(merged["family"])] + sorted(
        set(merged["family"]) - set(FAMILY_ORDER))
    colors = dict(zip(families, sns.color_palette("colorblind", len(families))))
    markers = dict(zip(families, "osD^vP*X"))
    with matplotlib.rc_context(figure_style(STYLE)):
        fig = new_figure(3.3 * len(panels) + 1.2, 3.0)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, d in zip(axes, panels):
            m = merged[merged["dataset"] == d].reset_index(drop=True)
            for f in families:
                sub = m[m["family"] == f]
                if not sub.empty:
                    ax.scatter(sub["drop_pp"], sub["ssim_mean"], color=colors[f], marker=markers[f], s=22, label=f,
                               zorder=3)  # fmt: skip
            front = pareto_front(m["drop_pp"], m["ssim_mean"])
            if front:
                fx, fy = m.loc[front, "drop_pp"], m.loc[front, "ssim_mean"]
                ax.plot(fx, fy, drawstyle="steps-post", color="0.25", lw=1, ls="--", label="Pareto frontier",
                        zorder=2)  # fmt: skip
            for r in m.itertuples():
                ax.annotate(str(r.defense_label), (r.drop_pp, r.ssim_mean), fontsize=4.5, color="0.35",
                            xytext=(2, 2), textcoords="offset points")  # fmt: skip
            ax.set_title(d)
            ax.set_xlabel("accuracy drop vs no defense (percentage points)")
        axes[0].set_ylabel("leakage: mean SSIM of reconstruction\n(higher = more leakage)")
        entries: dict[str, Any] = {}
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(name, handle)
        names = [f for f in families if f in entries] + (["Pareto frontier"] if "Pareto frontier" in entries else [])
        axes[-1].legend([entries[n] for n in names], names, loc="upper left", bbox_to_anchor=(1.02, 1),
                        frameon=False)
        fig.suptitle("Privacy-utility trade-off per defense setting (lower left is better)")
    return fig


def plot_batch_size(records: pd.DataFrame, datasets: Sequence[str]) -> Figure | None:
    if "batch_size" not in records or records["batch_size"].nunique() < 2:
        return None
    r = records[records["defense"] == "none"] if (records["defense"] == "none").any() else records
    if r["batch_size"].nunique() < 2:
        return None
    panels = (("closures", "closures (objective evaluations) used"), ("ssim", "final SSIM (higher = more leakage)"))
    colors = dict(zip(datasets, sns.color_palette("colorblind", len(datasets))))
    sizes = sorted(int(b) for b in r["batch_size"].unique())
    with matplotlib.rc_context(figure_style(STYLE)):
        fig = new_figure(7.0, 2.8)
        axes = fig.subplots(1, 2, squeeze=False)[0]
        for ax, (col, ylabel) in zip(axes, panels):
            for d in datasets:
                sub = r[r["dataset"] == d]
                if sub.empty:
                    continue
                xs, ys, lo, hi = [], [], [], []
                for b, g in sub.groupby("batch_size"):
                    mean, a, z = _mean_ci(g[col].to_numpy(dtype=float))
                    xs.append(int(b))
                    ys.append(mean)
                    lo.append(0.0 if math.isnan(a) else mean - a)
                    hi.append(0.0 if math.isnan(z) else z - mean)
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3.5, lw=1.2, capsize=2.5, color=colors[d], label=d)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_xlabel("victim batch size B (images, log scale)")
            ax.set_ylabel(f"{ylabel}\nmean (95 % CI)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        which = "undefended attack" if (records["defense"] == "none").any() else "all defenses"
        fig.suptitle(f"Victim batch size ({which})")
    return fig


# -------------------------------------------------------------------------- render


def _dataset_order(records: pd.DataFrame, accuracy: pd.DataFrame, info: dict) -> list[str]:
    present = set(records["dataset"].dropna().astype(str))
    if not accuracy.empty:
        present |= set(accuracy["dataset"].dropna().astype(str))
    listed = [str(d) for d in (info.get("datasets") or []) if str(d) in present]
    listed = list(dict.fromkeys(listed))
    return listed + sorted(present - set(listed))


def _rule_text(info: dict) -> str:
    if "success" not in info:
        return "the preset's success rule (not recorded in run.json)"
    try:
        return f"`{parse_success(info['success'])}`"
    except Exception:  # noqa: BLE001 - a report never fails on a damaged run.json
        return f"`{info['success']}`"


def render_markdown(claims: Sequence[Claim], info: dict, notes: Sequence[str], setup: Sequence[str],
                    figures: dict[str, str | None], figure_notes: Sequence[str]) -> str:  # fmt: skip
    lines = [f"# Reproducing the DLG paper's defense claims: preset `{info.get('preset') or 'unknown'}`", ""]
    for n in [*(info.get("notices") or []), *notes]:
        lines += [f"> **Note:** {n}", ""]
    lines += ["Zhu, Liu & Han, *Deep Leakage from Gradients*, NeurIPS 2019, Sec. 5 (defenses). Every verdict below "
              "is computed from the stored results by `bench/reproduction.py`; none is written by hand.", ""]
    lines += ["## Verdicts", "", "| claim | verdict | where |", "|:--|:--|:--|"]
    for c in claims:
        lines.append(f"| {c.key}. {c.title} | **{c.verdict}** | {c.summary} |")
    lines += ["", "## Setup and thresholds", ""]
    lines += [f"- {s}" for s in setup]
    lines += [
        f"- **Defended**: {defended_rule_text()}, i.e. with 95 % confidence the attack recovers fewer than half of "
        "the images; *not defended* when it is not defended and at least one attack succeeded; *inconclusive* "
        "when no attack succeeded but there are too few images to call it defended (n ≤ 3); inconclusive settings "
        "are left out of verdicts. Claims about defenses are tested only on datasets where the undefended attack "
        "is *not defended* (otherwise there is no leakage to defend against: *not measured*).",
        f"- **Costs accuracy**: mean accuracy drop against the undefended run with the same budget and seed "
        f"≥ {ACCURACY_TOLERANCE_PP:g} percentage points, or training diverged; otherwise **keeps accuracy**.",
        f"- Boundaries from the paper: noise variance {NOISE_TEXT}; pruning sparsity {PRUNE_BOUNDARY:g} %; "
        f"high sparsity ≥ {HIGH_SPARSITY:g} %.",
        "- Verdicts: per dataset, *holds* when every tested setting behaves as claimed, *does not hold* when none "
        "does, *partly* otherwise; over datasets the same rule combines the per-dataset verdicts, leaving out "
        "datasets where the claim was *not measured* (the reason is given).",
        "- Intervals: 95 %. Success rates: Wilson score interval (counts over images × seeds). Means (SSIM, "
        "closures, accuracy and drop over ≥ 2 seeds): Student-t, mean ± t(0.975, n−1)·s/√n. Accuracy of a single "
        "seed: Wilson interval over the test images (test-set sampling only, not training randomness). Verdicts "
        "compare point estimates with the thresholds; read them together with the intervals.",
        "",
    ]
    for c in claims:
        lines += [f"## Claim {c.key}: {c.title}", "", f"*Paper:* {c.paper}", "", f"*Test:* {c.test}", "",
                  f"**Verdict: {c.verdict}** — {c.summary}", ""]  # fmt: skip
        for r in c.results:
            head = f"- **{r.dataset}: {r.verdict}**" + (f" — {r.reason}" if r.reason else "")
            lines.append(head)
            lines += [f"  - {x}" for x in r.lines if x]
        lines.append("")
    lines += ["## Figures and tables", ""]
    for title, stem in figures.items():
        if stem:
            lines += [f"![{title}]({stem}.png)", "", f"{title}: [PNG]({stem}.png), [PDF]({stem}.pdf)", ""]
    for n in figure_notes:
        lines += [f"- {n}"]
    lines += ["", "Tables: paper table ([Markdown](tables/paper_table.md), [LaTeX](tables/paper_table.tex), "
              "[CSV](tables/paper_table.csv)); weakest defending strength ([Markdown](tables/weakest_defending.md), "
              "[LaTeX](tables/weakest_defending.tex), [CSV](tables/weakest_defending.csv)).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _setup_lines(scoped: pd.DataFrame, acc: pd.DataFrame, info: dict) -> list[str]:
    out = []
    model = ", ".join(sorted(set(scoped["model"].dropna().astype(str)))) or "?"
    attack = ", ".join(sorted(set(scoped["attack"].dropna().astype(str)))) or "?"
    sizes = ", ".join(str(int(b)) for b in sorted(scoped["batch_size"].dropna().unique())) or "?"
    seeds = ", ".join(str(int(s)) for s in sorted(scoped["seed"].dropna().unique())) or "?"
    out.append(f"**Leakage**: attack {attack} on model {model}, victim batch size B = {sizes}, seeds {seeds}; "
               f"attack success rule {_rule_text(info)}; leakage shown as mean SSIM (higher = more leakage).")
    if acc.empty:
        out.append("**Accuracy**: not measured (no accuracy results in this store).")
    else:
        first = acc.iloc[0].to_dict()
        splits = "; ".join(dict.fromkeys(str(s) for s in acc["split"]))
        out.append(f"**Accuracy**: {_budget_text(first)}; simulated synchronous data-parallel SGD in which every "
                   f"worker's shard gradient goes through the defense before averaging; images 3 × "
                   f"{int(first.get('image_size', 32))} × {int(first.get('image_size', 32))} as in the leakage "
                   f"part; data: {splits}. The trained model ({first.get('model')}) differs from the attacked one "
                   f"({model}); the drop is test accuracy without defense minus with it, same seed.")  # fmt: skip
    return out


def write_reproduction(out: Path, records: pd.DataFrame, accuracy: pd.DataFrame | None,
                       run_info: dict) -> list[Path]:  # fmt: skip
    """Write the reproduction figures, tables and REPRODUCTION.md under ``out``; return the paths written.

    ``records``: :func:`bench.report.collect_records`; ``accuracy``:
    :func:`bench.accuracy.collect_accuracy` (None or empty: accuracy not measured);
    ``run_info``: :func:`bench.report.read_run_info` (notices, success rule, datasets).
    """
    out = Path(out)
    info = dict(run_info or {})
    records, notes = _dedupe(records)
    scoped, scope_notes = _scope(records)
    notes += scope_notes
    acc_rows, acc_notes = _scope_accuracy(accuracy)
    notes += acc_notes
    if acc_rows.empty:
        notes.append("No accuracy results: claims 2, 4b and 6 and the trade-off figure are not measured. Run the "
                     "preset's [training] jobs to measure them.")  # fmt: skip
    datasets = _dataset_order(scoped, acc_rows, info)
    leak = _sorted(leakage_summary(scoped), datasets)
    acc = _sorted(accuracy_summary(acc_rows), datasets)
    leak_ds = [d for d in datasets if d in set(leak["dataset"])]
    acc_ds = [d for d in datasets if not acc.empty and d in set(acc["dataset"])]
    claims = evaluate_claims(leak, acc, leak_ds, acc_ds)

    files: dict[str, bytes] = {}
    table = paper_table(leak, acc, datasets)
    rule = defended_rule_text()
    md_head = (f"Paper table: accuracy of the trained model and leakage of the attack per dataset and defense setting. "
               f"{rule}. Intervals 95 % (see REPRODUCTION.md).\n\n")  # fmt: skip
    files["tables/paper_table.md"] = (md_head + _markdown(_format_paper_table(table, "—")) + "\n").encode()
    files["tables/paper_table.tex"] = _latex(
        _format_paper_table(table, "--"),
        f"Accuracy and gradient leakage per defense setting; {rule}; 95\\,\\% intervals.", "tab:paper").encode()
    files["tables/paper_table.csv"] = table.to_csv(index=False, lineterminator="\n").encode()
    weakest = weakest_table(leak, acc, datasets)
    w_head = (f"Weakest defending strength per dataset and defense (weakest = lowest noise variance, lowest "
              f"sparsity, most bits). {rule}.\n\n")  # fmt: skip
    files["tables/weakest_defending.md"] = (w_head + _markdown(_format_weakest(weakest, "—")) + "\n").encode()
    files["tables/weakest_defending.tex"] = _latex(
        _format_weakest(weakest, "--"), f"Weakest defending strength per dataset and defense; {rule}.",
        "tab:weakest").encode()
    files["tables/weakest_defending.csv"] = weakest.to_csv(index=False, lineterminator="\n").encode()

    figures: dict[str, str | None] = {}
    figure_notes: list[str] = []
    plots: dict[str, Figure] = {}
    arrays_of = CellArrays(out)
    fig = plot_iterations(arrays_of, scoped, leak_ds)
    if fig is None:
        figure_notes.append("No iteration figure: the store holds no snapshots (`snap_<step>` arrays) of an "
                            "undefended cell; rerun the undefended cells with snapshot steps to draw it.")
    else:
        plots["figures/iterations"] = fig
        figures["Reconstruction over iterations"] = "figures/iterations"
    families = [f for f in FAMILY_ORDER if f != "none" and f in set(scoped["family"])]
    families += sorted(set(scoped["family"].dropna().astype(str)) - set(FAMILY_ORDER))
    for f in families:
        fig = plot_family(arrays_of, scoped, f, leak_ds)
        if fig is not None:
            plots[f"figures/family_{f}"] = fig
            figures[f"Family {f}: reconstructions and loss curves"] = f"figures/family_{f}"
    fig = plot_tradeoff(leak, acc, datasets)
    if fig is None:
        figure_notes.append("No trade-off figure: no dataset has both leakage and accuracy results.")
    else:
        plots["figures/tradeoff"] = fig
        figures["Accuracy drop vs leakage"] = "figures/tradeoff"
    fig = plot_batch_size(records, datasets)
    if fig is not None:
        plots["figures/batch_size"] = fig
        figures["Victim batch size"] = "figures/batch_size"
    for stem, fig in plots.items():
        for fmt in ("png", "pdf"):
            files[f"{stem}.{fmt}"] = figure_bytes(fig, fmt)

    setup = _setup_lines(scoped, acc_rows, info)
    files["REPRODUCTION.md"] = render_markdown(claims, info, notes, setup, figures, figure_notes).encode()
    written = []
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    return written
