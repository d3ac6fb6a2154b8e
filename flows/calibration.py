"""Calibration flow: fit a selector (temperature + threshold) on labelled logits, save it, publish the evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import deployment

from flows._parameters import describe_parameters
from seapig_core.bundle import DEFAULT_KEEP_PREVIOUS, CalibrationSettings
from seapig_core.sources import check_source
from tasks import extract_logits_task, fit_selector_task, publish_calibration_artifacts
from tasks.artifacts import log_calibration_diagnostics, pipeline_key


@flow(name="calibration")
@describe_parameters
def calibration_flow(
    bundle_dir: str,
    logits_path: str | None = None,
    model: str | None = None,
    data: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    store_dir: str | None = None,
    scores: list[str] | None = None,
    q: float = 0.95,
    target_risk: float | None = None,
    delta: float = 0.05,
    split_fraction: float = 0.5,
    seed: int = 0,
    task: str = "multiclass",
    per_member: bool = False,
    temperature: float | None = None,
    n_bins: int = 15,
    risk_method: str = "sgr",
    class_names: list[str] | None = None,
    confidence_head: bool = False,
    keep_previous: int = DEFAULT_KEEP_PREVIOUS,
    plot_dir: str | None = None,
    extract_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit a selector on calibration data and save it as a new bundle version, with review artifacts.

    The calibration parameters become one :class:`seapig_core.bundle.CalibrationSettings`,
    validated before any work. If the bundle's current version was calibrated from the same
    content with the same settings and library version and loads cleanly, it is reused
    (``reused`` is True: nothing is refitted or written); a bundle that fails to load is refitted.
    The bundle's calibration diagnostics (ties, nothing selected, a temperature at its bound,
    ...) are logged as warnings; the artifacts' keys come from the deployment's name, or from
    ``bundle_dir`` when run by hand (:mod:`tasks.artifacts`).

    Parameters
    ----------
    bundle_dir : str
        The bundle root: a new version is written there and the pointer switched to it.
    logits_path : str, optional
        A file of precomputed calibration logits with labels (``.npz``, ``.parquet``, ``.arrow``,
        a logits store entry; see ``seapig_core.sources``). Give this, or ``model`` and ``data``.
    model, data : str, optional
        Import paths ``"package.module:function"`` of a model factory (a module with
        ``.logits(x)``) and a data factory (a labelled DataLoader).
    model_kwargs, data_kwargs : dict, optional
        Keyword arguments of the factories.
    store_dir : str, optional
        Logits store for extraction; default ``<parent of bundle_dir>/logits``.
    scores : list of str, optional
        Score names, the first selects (default ``["softmax"]``).
    q : float
        Coverage quantile of the threshold.
    target_risk, delta : float, optional
        Select with the guaranteed-risk threshold instead: selective risk at most
        ``target_risk`` with probability at least ``1 - delta``.
    split_fraction, seed : float, int
        Share of the labelled samples that fit the temperature, and the split's seed; the
        threshold and the reported metrics use the rest.
    task, per_member : str, bool
        The logits' task (``multiclass``, ``binary``, ``multilabel``) and member axis.
    temperature : float, optional
        Use this temperature instead of fitting one.
    n_bins : int
        Bins of the expected calibration error in the report.
    risk_method : str
        Method of the guaranteed-risk threshold (``"sgr"``; see ``seapig_core.risk.METHODS``).
    class_names : list of str, optional
        Class names kept by the bundle for reports and review queues.
    confidence_head : bool
        The model outputs a learned confidence next to its logits (its ``logits(x)`` returns
        ``(logits, confidence_logit)``, stored as one extra last logit): every score reads the
        class logits and the ``confidence`` score, which needs this, the confidence. Scoring
        reads the setting from the bundle.
    keep_previous : int
        Old bundle versions kept besides the current one (rollback, and readers still using them).
    plot_dir : str, optional
        Also write the report's plots there as PNG files.
    extract_options : dict, optional
        Passed to ``seapig_core.extract.extract_logits`` (``input_key``, ``refresh``, ...).

    Returns
    -------
    dict
        ``seapig_core.pipeline.calibrate_file``'s summary: ``bundle_dir``, ``version``,
        ``version_path``, ``manifest_sha256``, ``threshold``, ``temperature``, ``calibration``
        and ``reused``.
    """
    settings = CalibrationSettings(
        scores=("softmax",) if scores is None else scores, q=q, task=task, per_member=per_member, temperature=temperature,
        target_risk=target_risk, delta=delta, split_fraction=split_fraction, seed=seed, n_bins=n_bins,
        risk_method=risk_method, class_names=class_names, confidence_head=confidence_head,
    )
    if isinstance(keep_previous, bool) or not isinstance(keep_previous, int) or keep_previous < 0:
        raise ValueError(f"The 'keep_previous' parameter must be a non-negative integer. Got {keep_previous!r} instead.")
    pipeline = pipeline_key(deployment.name, bundle_dir)
    if check_source(logits_path, model, data, "logits_path") == "model":
        store = store_dir or str(Path(bundle_dir).parent / "logits")
        extracted = extract_logits_task(model, data, store, model_kwargs, data_kwargs, "calibration", extract_options, pipeline)
        if len(extracted) != 1:
            raise ValueError(f"The calibration data factory {data!r} must return one DataLoader. Got {len(extracted)} batches.")
        logits_path = extracted[0]["path"]
    result = fit_selector_task(logits_path, bundle_dir, settings, keep_previous)
    log_calibration_diagnostics(result["calibration"])
    publish_calibration_artifacts(
        result["version_path"], plot_dir, pipeline=pipeline,
        provenance={"bundle_dir": result["bundle_dir"], "input_files": [logits_path], "output_dir": result["bundle_dir"]},
    )
    return result
