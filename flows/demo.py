"""The whole chain on the bundled digits example: ``python -m flows.demo`` (what ``make demo`` runs).

Trains (or loads) the small digits CNN, calibrates a selector on the calibration split, scores
query batches that mix clean test digits with noisy, rotated and out-of-distribution inputs,
and writes everything under ``demo_output/``:

- ``model/``: the CNNs' weights (safetensors), reused while the training settings match;
- ``logits/``: the logits store (extraction is skipped when model and data are unchanged);
- ``bundle/``: the selector bundle;
- ``selections/``: one ``<batch>.selections.parquet`` per query batch;
- ``plots/``: the calibration plots and one density plot per batch.

Then the same for the digits CNN with a learned confidence branch (DeVries and Taylor 2018,
:func:`seapig_core.examples.digits.digits_confidence_model`): a second selector whose primary
score is the confidence head's (``confidence``, beside the same network's ``softmax``), under
``demo_output/confidence/`` (``logits/``, ``bundle/``, ``selections/``, ``plots/``). Both of
its scores are thresholded at the ``q`` quantile, so that each rejects the same share of
held-out calibration digits, and the summary compares, per kind of query sample, what the
confidence head rejects with what the softmax score of the same network rejects.

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
    confidence_head: bool = True,
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
    confidence_head : bool
        Also calibrate and score the digits CNN with a learned confidence branch (the
        ``confidence`` score selects, ``softmax`` beside it, both at the ``q`` quantile), under
        ``<output_dir>/confidence``, and compare their rejections per kind of sample.
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
    result = {"paths": paths, "calibration": calibration["calibration"], "selections": scored["selections"]}
    if confidence_head:
        # The CNN with a confidence branch: its logits(x) returns (logits, confidence logit), stored
        # as 11 logits; the bundle records confidence_head, so scoring splits them the same way.
        # Both scores at the q quantile (no target risk): they reject the same share of held-out
        # calibration digits, so their rejections of the query kinds compare like for like.
        conf = {name: str(out / "confidence" / name) for name in ("logits", "bundle", "selections", "plots")}
        conf_model = f"{DIGITS}:digits_confidence_model"
        conf_calibration = calibration_flow(
            bundle_dir=conf["bundle"], model=conf_model, data=f"{DIGITS}:digits_loader", model_kwargs=model_kwargs,
            data_kwargs={"split": "calibration"}, store_dir=conf["logits"], scores=["confidence", "softmax"],
            q=q, target_risk=None, plot_dir=conf["plots"], confidence_head=True,
        )
        conf_scored = scoring_flow(
            bundle_dir=conf["bundle"], output_dir=conf["selections"], model=conf_model, data=f"{DIGITS}:query_loaders",
            model_kwargs=model_kwargs, data_kwargs={"n_batches": n_batches}, store_dir=conf["logits"],
            plot_dir=conf["plots"], rescore_on_new_bundle=True,
        )
        result["confidence"] = {
            "paths": conf, "calibration": conf_calibration["calibration"], "selections": conf_scored["selections"],
        }
    return result


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
    print(f"  {_calibration_line(cal)}")
    tables = [read_selections(path) for path in result["selections"].values()]
    by_kind = rejection_by_kind(pd.concat(tables, ignore_index=True))
    by_kind.insert(0, "what", [QUERY_KINDS.get(kind, "") for kind in by_kind.index])
    print("\nQuery batches, rejections by kind of sample:")
    print(by_kind.to_string(float_format=lambda v: f"{v:.1%}"))
    confidence = result.get("confidence")
    if confidence is not None:
        _print_confidence_comparison(confidence)
    print("\nOutputs:")
    print(f"  selections  {paths['selections']}/<batch>.selections.parquet")
    print(f"  plots       {paths['plots']}/*.png")
    print(f"  bundle      {paths['bundle']}")
    print(f"  logits      {paths['logits']}   model weights  {paths['model']}")
    if confidence is not None:
        print(f"  confidence head: bundle, selections, logits and plots under {Path(confidence['paths']['bundle']).parent}")
    print("\nReview the artifacts (<pipeline>--calibration-report, <pipeline>--scoring-report, <pipeline>--review--<batch>, ...) "
          "in the Prefect UI:")
    if ui_url:
        print(f"  {ui_url}/artifacts   (this run: {ui_url}/runs/flow-run/{flow_run_id})")
    else:
        print("  .venv/bin/prefect server start      # same PREFECT_HOME as this run; then open")
        print(f"  http://127.0.0.1:4200/artifacts     (this run: http://127.0.0.1:4200/runs/flow-run/{flow_run_id})")


def _calibration_line(cal: dict[str, Any]) -> str:
    risk = cal.get("selective_risk")
    return (
        f"accuracy {cal['accuracy']:.3f}, temperature {cal['temperature']:.3f}, "
        f"NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, "
        f"AURC {cal['aurc']:.4f}; threshold {cal['threshold']:.4f} keeps {cal['coverage']:.1%} "
        f"with selective risk {'n/a' if risk is None else f'{risk:.3f}'}"
    )


def _print_confidence_comparison(confidence: dict[str, Any]) -> None:
    """The confidence head's calibration, and its rejections per kind beside its network's softmax score's."""
    import pandas as pd

    from seapig_core.examples.digits import QUERY_KINDS, compare_rejections_by_kind
    from seapig_core.selections import read_selections

    cal = confidence["calibration"]
    softmax = cal.get("per_score", {}).get("softmax", {})
    print("\nThe CNN with a learned confidence branch (DeVries and Taylor 2018), its confidence selecting:")
    print(f"  {_calibration_line(cal)}")
    if softmax.get("aurc") is not None:
        print(f"  the same network's softmax score: AURC {softmax['aurc']:.4f} (lower: ranks the errors better)")
    table = pd.concat([read_selections(path) for path in confidence["selections"].values()], ignore_index=True)
    by_softmax = pd.DataFrame({"sample_id": table["sample_id"], "selected": table["selected_softmax"]})
    compared = compare_rejections_by_kind({"softmax": by_softmax, "confidence head": table})
    compared.insert(0, "what", [QUERY_KINDS.get(kind, "") for kind in compared.index])
    print(
        "\nRejection rate by kind of sample, the same network's softmax score and its confidence head, each "
        f"thresholded at q = {cal['q']:g} of the held-out calibration digits:"
    )
    print(compared.to_string(float_format=lambda v: f"{v:.1%}"))


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
    parser.add_argument(
        "--no-confidence-head", dest="confidence_head", action="store_false",
        help="skip the CNN with a learned confidence branch and its comparison with the softmax score",
    )
    args = parser.parse_args(argv)
    # The temporary server would try to send usage telemetry (and log an error offline); a
    # user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to start; a first start on a busy machine (its
    # database migrations) can take longer, and the demo would then fail before it began.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    target, ui_url = _prefect_target()
    print(f"seapig-core demo: running the calibration and scoring flows against {target}.")
    state = demo_flow(
        output_dir=args.output_dir, n_batches=args.batches, q=args.q, target_risk=args.target_risk or None,
        confidence_head=args.confidence_head, return_state=True,
    )
    if not state.is_completed():
        print(f"The demo flow run ended {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    _print_summary(state.result(), ui_url, state.state_details.flow_run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
