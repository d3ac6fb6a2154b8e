"""The whole chain on the bundled digits example: ``python -m flows.demo`` (what ``make demo`` runs).

Trains (or loads) the small digits CNN, calibrates a selector on the calibration split, scores
query batches that mix clean test digits with noisy, rotated and out-of-distribution inputs,
and writes everything under ``demo_output/``:

- ``model/``: the CNN's weights (safetensors), reused while the training settings match;
- ``logits/``: the logits store (extraction is skipped when model and data are unchanged);
- ``bundle/``: the selector bundle;
- ``selections/``: one ``<batch>.selections.parquet`` per query batch;
- ``plots/``: the calibration plots and one density plot per batch.

Prefect: with ``PREFECT_API_URL`` unset, the flows run against Prefect's temporary local
server (SQLite under ``PREFECT_HOME``, ``~/.prefect`` by default); the runs and artifacts stay
in that database, so ``prefect server start`` shows them afterwards. A configured
``PREFECT_API_URL`` or ``PREFECT_HOME`` (environment or profile) is used as is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows._parameters import describe_parameters
from flows.calibration import calibration_flow
from flows.scoring import scoring_flow

DIGITS = "seapig_core.examples.digits"


@flow(name="demo")
@describe_parameters
def demo_flow(
    output_dir: str = "demo_output",
    n_batches: int = 3,
    q: float = 0.95,
    target_risk: float | None = 0.05,
    scores: list[str] | None = None,
) -> dict[str, Any]:
    """Calibrate and score the digits example end to end; return where the outputs are.

    Parameters
    ----------
    output_dir : str
        Everything is written below it.
    n_batches : int
        Query batches to score.
    q : float
        Coverage quantile of the thresholds.
    target_risk : float, optional
        Select with the guaranteed-risk threshold (selective risk at most this, w.p. 95 %);
        None for the ``q`` quantile.
    scores : list of str, optional
        Scores to calibrate, the first selects (default softmax, energy, entropy).
    """
    out = Path(output_dir).resolve()
    paths = {name: str(out / name) for name in ("model", "logits", "bundle", "selections", "plots")}
    model = f"{DIGITS}:digits_model"
    model_kwargs = {"cache_dir": paths["model"]}
    calibration = calibration_flow(
        bundle_dir=paths["bundle"], model=model, data=f"{DIGITS}:digits_loader", model_kwargs=model_kwargs,
        data_kwargs={"split": "calibration"}, store_dir=paths["logits"], scores=scores or ["softmax", "energy", "entropy"],
        q=q, target_risk=target_risk, plot_dir=paths["plots"],
    )
    # The demo scores with the bundle it just calibrated: a new version rescores the batches.
    scored = scoring_flow(
        bundle_dir=paths["bundle"], output_dir=paths["selections"], model=model, data=f"{DIGITS}:query_loaders",
        model_kwargs=model_kwargs, data_kwargs={"n_batches": n_batches}, store_dir=paths["logits"], plot_dir=paths["plots"],
        rescore_on_new_bundle=True,
    )
    return {"paths": paths, "calibration": calibration["calibration"], "selections": scored["selections"]}


def _prefect_target() -> tuple[str, str | None]:
    """(a description of the Prefect API in use, the UI's URL or None for the temporary server)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return f"the Prefect server at {settings.api.url}", settings.ui_url
    return f"Prefect's temporary local server (database under PREFECT_HOME={settings.home})", None


def _print_summary(result: dict[str, Any], ui_url: str | None, flow_run_id: Any) -> None:
    import pandas as pd

    from seapig_core.examples.digits import QUERY_KINDS, rejection_by_kind
    from seapig_core.selections import read_selections

    paths, cal = result["paths"], result["calibration"]
    print("\nCalibration (held-out half of the calibration split):")
    print(
        f"  accuracy {cal['accuracy']:.3f}, temperature {cal['temperature']:.3f}, "
        f"NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, "
        f"AURC {cal['aurc']:.4f}; threshold {cal['threshold']:.4f} keeps {cal['coverage']:.1%} "
        f"with selective risk {cal['selective_risk']:.3f}"
    )
    tables = [read_selections(path) for path in result["selections"].values()]
    by_kind = rejection_by_kind(pd.concat(tables, ignore_index=True))
    by_kind.insert(0, "what", [QUERY_KINDS.get(kind, "") for kind in by_kind.index])
    print("\nQuery batches, rejections by kind of sample:")
    print(by_kind.to_string(float_format=lambda v: f"{v:.1%}"))
    print("\nOutputs:")
    print(f"  selections  {paths['selections']}/<batch>.selections.parquet")
    print(f"  plots       {paths['plots']}/*.png")
    print(f"  bundle      {paths['bundle']}")
    print(f"  logits      {paths['logits']}   model weights  {paths['model']}")
    print("\nReview the artifacts (<pipeline>--calibration-report, <pipeline>--scoring-report, <pipeline>--review--<batch>, ...) "
          "in the Prefect UI:")
    if ui_url:
        print(f"  {ui_url}/artifacts   (this run: {ui_url}/runs/flow-run/{flow_run_id})")
    else:
        print("  .venv/bin/prefect server start      # same PREFECT_HOME as this run; then open")
        print(f"  http://127.0.0.1:4200/artifacts     (this run: http://127.0.0.1:4200/runs/flow-run/{flow_run_id})")


def main(argv: list[str] | None = None) -> int:
    """Run :func:`demo_flow` and print where its outputs are and how to review them."""
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output", help="where to write everything (default: demo_output)")
    parser.add_argument("--batches", type=int, default=3, help="query batches to score (default: 3)")
    parser.add_argument("--q", type=float, default=0.95, help="coverage quantile (default: 0.95)")
    parser.add_argument(
        "--target-risk", type=float, default=0.05,
        help="guaranteed selective risk of the threshold, or 0 to select at the q quantile (default: 0.05)",
    )
    args = parser.parse_args(argv)
    # The temporary server would try to send usage telemetry (and log an error offline); a
    # user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    target, ui_url = _prefect_target()
    print(f"seapig-core demo: running the calibration and scoring flows against {target}.")
    state = demo_flow(
        output_dir=args.output_dir, n_batches=args.batches, q=args.q, target_risk=args.target_risk or None,
        return_state=True,
    )
    if not state.is_completed():
        print(f"The demo flow run ended {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    _print_summary(state.result(), ui_url, state.state_details.flow_run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
