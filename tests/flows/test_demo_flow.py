"""`python -m flows.demo` (what `make demo` runs): outputs, printed guidance, and Prefect's embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.demo import main
from seapig_core.selections import read_selections

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _check_outputs(out: Path, n_batches: int) -> None:
    selections = sorted((out / "selections").glob("*.selections.parquet"))
    assert [p.name for p in selections] == [f"batch-{i:03d}.selections.parquet" for i in range(n_batches)]
    table = pd.concat([read_selections(p) for p in selections])
    assert table["selected"].any() and (~table["selected"]).any()  # both accepted and rejected samples
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"calibration-density.png", "calibration-reliability.png", "calibration-risk-coverage.png"} <= plots
    assert {f"batch-{i:03d}-density.png" for i in range(n_batches)} <= plots
    assert (out / "bundle" / "current.json").is_file() and any((out / "model").glob("*.safetensors"))


def _check_confidence_outputs(out: Path, n_batches: int) -> None:
    """The CNN with a confidence branch: its own bundle (confidence_head), selections and plots."""
    from seapig_core.bundle import load_bundle

    bundle = load_bundle(out / "confidence" / "bundle")
    assert bundle.confidence_head and bundle.primary_name == "confidence" and list(bundle.scores) == ["confidence", "softmax"]
    assert bundle.n_units == 10 and bundle.q == 0.95 and bundle.risk_threshold is None  # both at the q quantile
    selections = sorted((out / "confidence" / "selections").glob("*.selections.parquet"))
    assert len(selections) == n_batches
    table = pd.concat([read_selections(p) for p in selections])
    assert {"score", "selected", "score_softmax", "selected_softmax"} <= set(table.columns)
    assert table["score"].between(-1, 0).all() and table["prediction"].between(0, 9).all()  # never the confidence unit
    assert table["selected"].any() and (~table["selected"]).any()
    assert any((out / "model").glob("digits-confidence-cnn-*.safetensors"))
    assert (out / "confidence" / "plots" / "calibration-density.png").is_file()


@pytest.mark.usefixtures("prefect_server")
def test_demo_main_against_a_configured_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--output-dir", str(tmp_path / "demo"), "--batches", "2"]) == 0
    _check_outputs(tmp_path / "demo", 2)
    _check_confidence_outputs(tmp_path / "demo", 2)
    printed = capsys.readouterr().out
    # The per-kind comparison of the confidence head's rejections with the softmax score's.
    comparison = printed.split("Rejection rate by kind of sample, the same network's softmax score and its confidence head")[1]
    header, *rows = comparison.split("Outputs:")[0].strip().splitlines()[1:]
    assert header.split()[-4:] == ["samples", "softmax", "confidence", "head"]
    assert [row.split()[0] for row in rows[1:]] == ["digit", "noisy", "rotated", "shape", "photo"]
    assert all(row.strip().endswith("%") for row in rows[1:])
    assert "the Prefect server at http://127.0.0.1:" in printed  # the configured API is used as is
    assert "rejection_rate" in printed and "photo" in printed and str(tmp_path / "demo" / "selections") in printed
    assert "/artifacts" in printed


def test_demo_uses_the_temporary_server_under_the_users_prefect_home(digits: dict[str, Path], tmp_path: Path) -> None:
    home = tmp_path / "my-prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="WARNING")
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--output-dir", str(out), "--batches", "1", "--no-confidence-head"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _check_outputs(out, 1)
    assert not (out / "confidence").exists() and "confidence head" not in run.stdout  # skipped on request
    assert f"temporary local server (database under PREFECT_HOME={home})" in run.stdout
    assert (home / "prefect.db").is_file()  # the runs stay there for `prefect server start`
    assert "prefect server start" in run.stdout and "http://127.0.0.1:4200/artifacts" in run.stdout
