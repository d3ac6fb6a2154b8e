"""Guaranteed-risk thresholds (SGR) on the shared CIFAR-100 record: does the guarantee hold?

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_risk.py [--splits 200] [--seed 0]

For each setting, over ``--splits`` random splits of the 10,000 DenseNet-BC-100 CIFAR-100 test
outputs into a calibration part and a test part:

1. the threshold is chosen on the calibration part by
   :func:`seapig_core.risk.guaranteed_risk_threshold` (target risk ``r``, ``delta``);
2. the realised selective risk of that threshold is measured on the test part; a split
   *violates* when it exceeds ``r``. The guarantee says a violation (of the distribution's
   risk) has probability at most ``delta``; the count over the splits is compared with the
   binomial limit ``binom.ppf(0.999, splits, delta)`` (exceeded with probability < 0.1% when
   the violation probability is exactly ``delta``);
3. the coverage reached on the test part is reported beside two oracles on the same test part:
   the *hindsight* coverage (the largest coverage whose test selective risk is at most ``r``
   with the same score, i.e. the threshold chosen with the test labels) and the *perfect
   ordering* coverage (rejecting errors first).

Protocols: ``threshold only``: temperature 1 (MSP of the raw logits), threshold on half the
record, test on the other half. ``split``: the split protocol through the public API,
``SoftmaxScore().fit(part A)`` fits the temperature on a quarter, ``set_risk_threshold(X=part B,
Y=...)`` sets the threshold on another quarter, and the remaining half tests it.

Writes ``benchmarks/results/risk.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seapig_core.metrics import prediction_errors, risk_coverage  # noqa: E402
from seapig_core.risk import guaranteed_risk_threshold  # noqa: E402
from seapig_core.scores import SoftmaxScore  # noqa: E402

DATA = Path(os.environ.get("SEAPIG_SHARED_DATA", REPO.parent / "shared" / "data")) / "densenet-bc-100-cifar-100.npz"


def load() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as record:
        probs = record["predictions"].astype(np.float64)
        labels = record["ground_truth"].astype(np.int64)
    return np.log(probs).astype(np.float32), labels


def oracle_coverages(test_scores: np.ndarray, test_errors: np.ndarray, target: float) -> tuple[float, float]:
    """Hindsight coverage with the same score, and the perfect-ordering coverage, on the test part."""
    rc = risk_coverage(test_scores, test_errors)
    ok = np.flatnonzero(rc.oracle_risk <= target)
    perfect = float(rc.oracle_coverage[ok[-1]]) if ok.size else 0.0
    return float(rc.coverage_at(target)), perfect


def simulate(logits, labels, target, delta, n_splits, seed, protocol):
    n = labels.size
    rng = np.random.default_rng(seed)
    errors_t1 = prediction_errors(logits, labels)
    scores_t1 = SoftmaxScore().fit(logits).scores.numpy()
    rows = []
    infeasible = 0
    for _ in range(n_splits):
        perm = rng.permutation(n)
        test = perm[n // 2 :]
        if protocol == "threshold only":
            cal = perm[: n // 2]
            try:
                rt = guaranteed_risk_threshold(scores_t1[cal], errors_t1[cal], target, delta)
            except ValueError:
                infeasible += 1
                continue
            test_scores, test_errors = scores_t1[test], errors_t1[test]
        else:
            part_a, part_b = perm[: n // 4], perm[n // 4 : n // 2]
            score = SoftmaxScore().fit(logits[part_a], labels[part_a])
            try:
                score.set_risk_threshold(target, delta, X=logits[part_b], Y=labels[part_b])
            except ValueError:
                infeasible += 1
                continue
            rt = score.risk_threshold
            test_scores = score.score(logits[test]).numpy()
            test_errors = prediction_errors(logits[test], labels[test], temperature=score.T)
        selected = test_scores < rt.threshold
        test_risk = float(test_errors[selected].mean()) if selected.any() else 0.0
        hindsight, perfect = oracle_coverages(test_scores, test_errors, target)
        rows.append((test_risk, float(selected.mean()), rt.coverage, rt.risk_bound, hindsight, perfect))
    return np.array(rows), infeasible


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "risk.md")
    args = parser.parse_args()

    # Per-split tensors are small (2,500 x 100): intra-op threads only add overhead, and on a
    # shared 2-core machine they made the split protocol ~20x slower.
    torch.set_num_threads(1)
    logits, labels = load()
    settings = [
        ("threshold only", 0.02, 0.05),
        ("threshold only", 0.05, 0.05),
        ("threshold only", 0.10, 0.05),
        ("threshold only", 0.10, 0.10),
        ("threshold only", 0.15, 0.05),
        ("split", 0.05, 0.05),
        ("split", 0.10, 0.05),
    ]
    lines = []
    start = time.perf_counter()
    for protocol, target, delta in settings:
        rows, infeasible = simulate(logits, labels, target, delta, args.splits, args.seed, protocol)
        limit = int(stats.binom.ppf(0.999, args.splits, delta))
        if rows.size:
            violations = int(np.sum(rows[:, 0] > target))
            test_risk, test_cov, cal_cov, bound, hindsight, perfect = rows.mean(axis=0)
            q95 = float(np.quantile(rows[:, 0], 0.95))
        else:
            violations, test_risk, test_cov, cal_cov, bound, hindsight, perfect, q95 = (0,) + (float("nan"),) * 7
        n_ok = len(rows)
        verdict = "ok" if violations <= limit else "VIOLATED"
        lines.append(
            f"| {protocol} | {target:.2f} | {delta:.2f} | {n_ok} ({infeasible} infeasible) | "
            f"{violations} ({violations / max(n_ok, 1):.1%}) | {limit} | {verdict} | {test_risk:.4f} | {q95:.4f} | "
            f"{bound:.4f} | {test_cov:.3f} | {cal_cov:.3f} | {hindsight:.3f} | {perfect:.3f} |"
        )
        print(lines[-1], flush=True)
    elapsed = time.perf_counter() - start

    command = "python benchmarks/bench_risk.py" + (f" --splits {args.splits}" if args.splits != 200 else "") + (
        f" --seed {args.seed}" if args.seed else ""
    )
    header = [
        "## Guaranteed-risk thresholds (SGR) on CIFAR-100",
        "",
        f"Command: `{command}` (from the repository root; {elapsed:.0f} s on {platform.node() or 'this machine'}, "
        f"{platform.machine()}, Python {platform.python_version()}).",
        "",
        f"DenseNet-BC-100 CIFAR-100 test outputs (10,000 samples, top-1 error {prediction_errors(logits, labels).mean():.4f}), "
        f"MSP score, {args.splits} random splits (seed {args.seed}); half of each split tests the threshold. "
        "`threshold only`: T = 1, threshold on the other half (5,000). `split`: temperature fitted on a quarter, "
        "threshold on another quarter (2,500) through `SoftmaxScore.fit` / `set_risk_threshold(X=, Y=)`.",
        "",
        "Violation: the realised test selective risk exceeds the target. Limit: `binom.ppf(0.999, splits, delta)`, "
        "the most violations expected (at the 99.9% level) if a violation had probability exactly `delta`. "
        "Coverages are means over the splits; *hindsight* is the largest test coverage with test risk <= target for "
        "the same score (threshold chosen with the test labels), *perfect* the coverage of an ordering that rejects "
        "every error first.",
        "",
        "| protocol | target risk | delta | splits (infeasible) | violations | limit | verdict | mean test risk | "
        "95% quantile of test risk | mean bound | test coverage | calibration coverage | hindsight coverage | "
        "perfect coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
