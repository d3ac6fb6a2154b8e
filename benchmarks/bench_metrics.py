"""Metrics on one validated layout, ECE/MCE against torchmetrics, and the DataFrame scores.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_metrics.py              # the full run, a few minutes
    .venv/bin/python benchmarks/bench_metrics.py --rows 200000 --reps 3   # a quick look

Three tables, all timed in this one process, interleaved (within a repetition every contender
runs once, in an order that rotates between repetitions), medians over repetitions:

1. **ECE/MCE vs torchmetrics** (issue 10 item 6). ``expected_calibration_error`` /
   ``maximum_calibration_error`` (15 equal-width bins, temperature 1.5) on raw float32 logits
   and on a ``CanonicalLogits``, against torchmetrics'
   ``multiclass_calibration_error(logits / T, target, num_classes, n_bins=15, norm="l1"/"max")``
   (it applies the softmax itself), with its default ``validate_args=True`` and with ``False``.
   Inputs: the shared CIFAR-100 record (10,000 x 100, ``log p`` as logits) and a synthetic
   ``--rows`` x 100 (default 1,000,000) float32 N(0, 3^2) with uniform labels (seed 0). The
   "before" column is this repository's ``seapig_core/metrics.py`` at commit ``a74ae37`` (the
   float64 path), loaded from git into the same process when git has it.
2. **Calibration metrics on one layout** (issue 10 item 1, calibration side). The metric calls a
   calibration makes (NLL and ECE at T = 1 and at T, Brier and the 0-1 errors at T, as
   ``bundle.fit_selector`` does) on ``--rows`` x 100: passing the raw logits to each, against
   canonicalising once (``canonicalize(..., require_finite=True)``, as ``fit`` does) and passing
   the ``CanonicalLogits``; with the number of ``torch.isfinite`` calls each made, and the same
   for the "before" module.
3. **DataFrames** (issue 11 item 4). ``boundary_score`` on a DataFrame of 1,000,000 rows of 10
   float32 probabilities (numpy arrays per row, as ``datasets``/``read_parquet`` give), and on a
   pyarrow list column; ``score_frame(df, "certainty_ratio")``; the playbook's own function on
   100,000 rows (it is a Python loop; its per-row cost is extrapolated to 1M).

The machine is shared: the load average at the start and the end is recorded; rerun on a quiet
machine for numbers to quote. Writes ``benchmarks/results/metrics.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_model  # noqa: E402

from seapig_core import metrics  # noqa: E402
from seapig_core.dataframe import boundary_score, score_frame  # noqa: E402
from seapig_core.layout import canonicalize  # noqa: E402

DATA = Path(os.environ.get("SEAPIG_SHARED_DATA", REPO.parent / "shared" / "data")) / "densenet-bc-100-cifar-100.npz"
RESULTS = REPO / "benchmarks" / "results" / "metrics.md"
BEFORE_COMMIT = "a74ae37"
TEMPERATURE = 1.5


def log(message: str) -> None:
    print(f"[bench_metrics] {message}", file=sys.stderr, flush=True)


def load_before() -> object | None:
    """``seapig_core/metrics.py`` as of :data:`BEFORE_COMMIT`, imported under another name."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:seapig_core/metrics.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        log(f"git cannot show {BEFORE_COMMIT}: the 'before' columns are skipped")
        return None
    path = Path(tempfile.mkdtemp()) / "metrics_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("metrics_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["metrics_before"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the old module may import names that have moved since
        log(f"the {BEFORE_COMMIT} metrics module does not import against this tree ({exc}): 'before' skipped")
        return None
    return module


def interleaved(contenders: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, one call each per repetition, rotating the order."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm-up
        contenders[name]()
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ms(values: list[float]) -> str:
    return f"{1e3 * float(np.median(values)):,.1f}"


def ratio(a: list[float], b: list[float]) -> str:
    """Median of the per-repetition ratios a / b."""
    return f"{float(np.median(np.array(a) / np.array(b))):.2f}x"


class IsfiniteCounter:
    """Counts ``torch.isfinite`` calls while active."""

    def __init__(self) -> None:
        self.count = 0
        self._real = torch.isfinite

    def __enter__(self) -> IsfiniteCounter:
        def counting(*args, **kwargs):
            self.count += 1
            return self._real(*args, **kwargs)

        torch.isfinite = counting
        return self

    def __exit__(self, *exc) -> None:
        torch.isfinite = self._real


# =========================================================================== 1. ECE/MCE


def ece_table(inputs: dict[str, tuple[torch.Tensor, torch.Tensor]], before, reps: int) -> list[str]:
    from torchmetrics.functional.classification import multiclass_calibration_error as tm

    lines = [
        "| input | metric | threads | ours, raw logits (ms) | ours, CanonicalLogits (ms) | torchmetrics (ms) | "
        "torchmetrics, validate_args=False (ms) | torchmetrics / ours (raw) | before (a74ae37) (ms) | "
        "|ours - torchmetrics| |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for input_name, (z, y) in inputs.items():
        canon = canonicalize(z, require_finite=True)
        k = z.shape[1]
        for metric, norm, ours_fn in (
            ("ECE", "l1", metrics.expected_calibration_error),
            ("MCE", "max", metrics.maximum_calibration_error),
        ):
            for threads in (DEFAULT_THREADS, 1):
                torch.set_num_threads(threads)
                contenders = {
                    "raw": lambda fn=ours_fn: fn(z, y, temperature=TEMPERATURE),
                    "canon": lambda fn=ours_fn: fn(canon, y, temperature=TEMPERATURE),
                    "tm": lambda norm=norm: tm(z / TEMPERATURE, y, num_classes=k, n_bins=15, norm=norm),
                    "tm_fast": lambda norm=norm: tm(z / TEMPERATURE, y, num_classes=k, n_bins=15, norm=norm, validate_args=False),
                }
                if before is not None:
                    before_fn = getattr(before, ours_fn.__name__)
                    contenders["before"] = lambda fn=before_fn: fn(z, y, temperature=TEMPERATURE)
                times = interleaved(contenders, reps)
                diff = abs(float(ours_fn(z, y, temperature=TEMPERATURE)) - float(tm(z / TEMPERATURE, y, num_classes=k, n_bins=15, norm=norm)))
                before_ms = ms(times["before"]) if before is not None else "-"
                lines.append(
                    f"| {input_name} | {metric} | {threads} | {ms(times['raw'])} | {ms(times['canon'])} | {ms(times['tm'])} | "
                    f"{ms(times['tm_fast'])} | **{ratio(times['tm'], times['raw'])}** | {before_ms} | {diff:.1e} |"
                )
                log(lines[-1])
        torch.set_num_threads(DEFAULT_THREADS)
    return lines


# =========================================================================== 2. one layout


def calibration_calls(module, logits, labels, T: float) -> None:
    """The metric calls a calibration makes (as bundle.fit_selector)."""
    module.prediction_errors(logits, labels, temperature=T)
    module.negative_log_likelihood(logits, labels, temperature=1.0)
    module.negative_log_likelihood(logits, labels, temperature=T)
    module.expected_calibration_error(logits, labels, temperature=1.0)
    module.expected_calibration_error(logits, labels, temperature=T)
    module.brier_score(logits, labels, temperature=T)


def layout_table(z: torch.Tensor, y: torch.Tensor, before, reps: int) -> list[str]:
    contenders = {
        "raw": lambda: calibration_calls(metrics, z, y, TEMPERATURE),
        "once": lambda: calibration_calls(metrics, canonicalize(z, require_finite=True), y, TEMPERATURE),
    }
    if before is not None:
        contenders["before"] = lambda: calibration_calls(before, z, y, TEMPERATURE)
    times = interleaved(contenders, reps)
    counts = {}
    for name, call in contenders.items():
        with IsfiniteCounter() as counter:
            call()
        counts[name] = counter.count
    rows = [
        ("raw logits to every call", "raw"),
        ("canonicalise once (require_finite=True), CanonicalLogits to every call", "once"),
    ]
    if before is not None:
        rows.append((f"before ({BEFORE_COMMIT}): raw logits to every call", "before"))
    lines = [
        "| variant | time (ms) | torch.isfinite calls |",
        "|---|---:|---:|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {ms(times[key])} | {counts[key]:,} |")
    return lines


# =========================================================================== 3. DataFrames


def playbook_boundary_score(df, probabilities_name="probabilities"):
    """Spotlight's playbook function (verbatim logic; see tests/core/test_dataframe.py)."""

    def compute_score(probs):
        indices = np.argsort(probs)[::-1]
        return [indices[0], indices[1], probs[indices[0]], probs[indices[1]]]

    df_out = pd.DataFrame()
    temp_scores = [compute_score(x) for x in df[probabilities_name]]
    df_out["decision_boundary_score"] = [x[3] / x[2] for x in temp_scores]
    df_out["decision_boundary_alternate_label"] = [x[1] for x in temp_scores]
    return df_out


def dataframe_table(rows: int, reps: int) -> list[str]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), rows).astype(np.float32)
    df = pd.DataFrame({"probabilities": list(probs)})
    arrow_type = pa.list_(pa.float32())
    df_arrow = pd.DataFrame({"probabilities": pd.Series(pa.array(list(probs), type=arrow_type), dtype=pd.ArrowDtype(arrow_type))})
    times = interleaved(
        {
            "boundary": lambda: boundary_score(df),
            "boundary_arrow": lambda: boundary_score(df_arrow),
            "frame": lambda: score_frame(df, "certainty_ratio"),
        },
        reps,
    )
    sample = min(rows, 100_000)
    small = df.iloc[:sample]
    start = time.perf_counter()
    reference = playbook_boundary_score(small)
    playbook_s = time.perf_counter() - start
    ours_small = boundary_score(small).reset_index(drop=True)
    identical = ours_small.equals(reference)
    per_row = playbook_s / sample
    return [
        "| measurement | median (ms) | per 1M rows (s) | note |",
        "|---|---:|---:|---|",
        f"| `boundary_score(df)`, {rows:,} rows x 10, float32 numpy arrays per row | {ms(times['boundary'])} | "
        f"{float(np.median(times['boundary'])) * 1e6 / rows:.2f} | identical to the playbook on the first {sample:,} rows: {identical} |",
        f"| `boundary_score(df)`, the same as a pyarrow list column | {ms(times['boundary_arrow'])} | "
        f"{float(np.median(times['boundary_arrow'])) * 1e6 / rows:.2f} | |",
        f"| `score_frame(df, 'certainty_ratio')` (score, prediction, alternate label) | {ms(times['frame'])} | "
        f"{float(np.median(times['frame'])) * 1e6 / rows:.2f} | |",
        f"| the playbook's own function, {sample:,} rows, once | {1e3 * playbook_s:,.1f} | {per_row * 1e6:.2f} | "
        f"a Python loop; extrapolated per 1M rows |",
    ]


# =========================================================================== main


DEFAULT_THREADS = torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic inputs")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per contender")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    wall = time.perf_counter()
    before = load_before()
    with np.load(DATA, allow_pickle=False) as record:
        cifar_logits = torch.from_numpy(np.log(record["predictions"].astype(np.float64)).astype(np.float32))
        cifar_labels = torch.from_numpy(record["ground_truth"].astype(np.int64))
    g = torch.Generator().manual_seed(0)
    synthetic = 3.0 * torch.randn(args.rows, 100, generator=g)
    synthetic_labels = torch.randint(0, 100, (args.rows,), generator=g)
    inputs = {
        "CIFAR-100 record, 10,000 x 100": (cifar_logits, cifar_labels),
        f"synthetic {args.rows:,} x 100": (synthetic, synthetic_labels),
    }
    log("table 1: ECE/MCE")
    table1 = ece_table(inputs, before, args.reps)
    log("table 2: one layout")
    table2 = layout_table(synthetic, synthetic_labels, before, max(3, args.reps // 2))
    log("table 3: DataFrames")
    table3 = dataframe_table(args.rows, args.reps)
    elapsed = time.perf_counter() - wall
    load_end = os.getloadavg()[0]

    command = " ".join([".venv/bin/python", "benchmarks/bench_metrics.py", *map(shlex.quote, sys.argv[1:])])
    import torchmetrics

    header = [
        "## Metrics: ECE/MCE vs torchmetrics, metrics on one validated layout, DataFrame scores",
        "",
        f"Command: `{command}` (from the repository root)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {elapsed:.0f} s  ",
        f"Machine: {cpu_model()}, nproc = {os.cpu_count()}, {platform.platform()}; load average (1 min) "
        f"{load_start:.2f} at the start, {load_end:.2f} at the end (the machine is shared: rerun on a quiet one "
        f"for numbers to quote)  ",
        f"torch {torch.__version__} ({DEFAULT_THREADS} threads by default), torchmetrics {torchmetrics.__version__}, "
        f"numpy {np.__version__}, pandas {pd.__version__}, pyarrow {pa.__version__}, Python {platform.python_version()}  ",
        f"Timing: one call per contender per repetition, interleaved with a rotating order, {args.reps} repetitions "
        "after a warm-up; medians; ratios are medians of per-repetition ratios.",
        "",
        "### ECE and MCE against torchmetrics (issue 10 item 6)",
        "",
        f"15 equal-width bins, temperature {TEMPERATURE}. torchmetrics gets `logits / T` and applies the softmax "
        "itself. *before* is `seapig_core/metrics.py` at a74ae37 (float64 probabilities, a separate finiteness "
        "pass), run in the same process. Target: torchmetrics / ours >= 1 on both inputs. On a busy machine the "
        "2-thread rows are dominated by scheduler stalls of the row-blocked passes' short parallel regions "
        "(DESIGN.md, issue 10 item 4, the `core` piece; the metrics use `CanonicalLogits.block_rows()` and inherit "
        "its fix); the 1-thread rows are the stable comparison.",
        "",
        *table1,
        "",
        "### Calibration metrics on one validated layout (issue 10 item 1, calibration side)",
        "",
        f"The six metric calls of a calibration (0-1 errors at T, NLL and ECE at T = 1 and T, Brier at T) on the "
        f"synthetic {args.rows:,} x 100 input. The metrics no longer run a separate `torch.isfinite` pass (they test "
        "each block they read with one sum); `torch.isfinite` calls left: the labels check and the predictions' "
        "finiteness (`prediction_errors`), and `canonicalize(require_finite=True)` once in the second row.",
        "",
        *table2,
        "",
        "### DataFrame scores (issue 11 item 4)",
        "",
        *table3,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
