"""Scoring loads a bundle lean and once per process (issue 10 item 6, the bundle side of scoring).

A 1M-sample bundle stores its calibration logits; scoring a query must not materialise them,
and many batches of a run (or the tasks of a Dask worker) must not reload and re-verify the
bundle every time, while a new calibration or a tampered file is still seen at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import seapig_core.bundle as bundle_module
import seapig_core.scores.state_file as state_file
from seapig_core.bundle import clear_bundle_cache, fit_selector, load_bundle, load_bundle_cached
from seapig_core.pipeline import score_file


def _bundle(root: Path, rows: int, k: int = 4, seed: int = 0, q: float = 0.9) -> Path:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (rows,), generator=g)
    logits = torch.randn(rows, k, generator=g)
    logits[torch.arange(rows), labels] += 2.0
    bundle = fit_selector(logits, labels, scores=["softmax", "margin"], q=q, temperature=1.0)
    bundle.save(root)
    return root


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The columns of score files materialised (logits, label, score)."""
    read: list[str] = []
    real = state_file._column

    def column(table, name):  # type: ignore[no-untyped-def]
        read.append(name)
        return real(table, name)

    monkeypatch.setattr(state_file, "_column", column)
    clear_bundle_cache()
    yield read
    clear_bundle_cache()


@pytest.mark.slow
def test_scoring_with_a_million_sample_bundle_does_not_read_its_calibration_logits(tmp_path: Path, spy: list[str]) -> None:
    root = _bundle(tmp_path / "bundle", 1_000_000)
    assert load_bundle(root).primary.logits.shape == (1_000_000, 4)  # stored, and reports still load them
    spy.clear()
    np.save(tmp_path / "q.npy", np.random.default_rng(1).standard_normal((2000, 4)).astype(np.float32))
    for i in range(3):
        result = score_file(root, tmp_path / "q.npy", tmp_path / "out", f"q{i}")
        assert result["samples"] == 2000 and result["calibration_samples"] == 1_000_000
    assert spy == ["score", "score"]  # each score file's scores, once for all three batches; no logits, no labels
    cached = load_bundle_cached(root)
    assert cached.primary.logits is None and cached.primary.labels is None and cached.primary.scores.shape == (1_000_000,)


def test_the_bundle_is_loaded_once_per_process_per_version(tmp_path: Path, spy: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = _bundle(tmp_path / "bundle", 500)
    np.save(tmp_path / "q.npy", np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32))
    loads: list[Path] = []
    real = bundle_module._load_version

    def counted(version_path, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(version_path)
        return real(version_path, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "_load_version", counted)
    first = score_file(root, tmp_path / "q.npy", tmp_path / "out", "a")
    score_file(root, tmp_path / "q.npy", tmp_path / "out", "b")
    score_file(Path(first["bundle_dir"]) / "versions" / first["bundle_version"], tmp_path / "q.npy", tmp_path / "out", "c")
    assert len(loads) == 1 and load_bundle_cached(root) is load_bundle_cached(loads[0])
    # A new calibration switches the pointer: the next batch is scored with it.
    _bundle(root, 600, seed=1, q=0.8)
    second = score_file(root, tmp_path / "q.npy", tmp_path / "out", "d")
    assert second["bundle_version"] != first["bundle_version"] and len(loads) == 2
    # A file of a cached version replaced by hand is loaded (and refused) again.
    version = Path(second["bundle_dir"]) / "versions" / second["bundle_version"]
    score = version / "softmax.arrow"
    score.write_bytes(score.read_bytes()[:-8] + b"12345678")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        score_file(version, tmp_path / "q.npy", tmp_path / "out", "e")
    assert len(loads) == 3


def test_the_cache_is_bounded(tmp_path: Path, spy: list[str]) -> None:
    roots = [_bundle(tmp_path / f"b{i}", 200, seed=i) for i in range(bundle_module.BUNDLE_CACHE_SIZE + 2)]
    bundles = [load_bundle_cached(root) for root in roots]
    assert len(bundle_module._CACHE) == bundle_module.BUNDLE_CACHE_SIZE
    assert load_bundle_cached(roots[-1]) is bundles[-1] and load_bundle_cached(roots[0]) is not bundles[0]
