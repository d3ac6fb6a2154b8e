"""The bundled digits example: splits, deterministic training, the weights cache, query batches."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seapig_core.examples import digits
from seapig_core.examples._weights import load_tensors, save_tensors


def test_splits_are_fixed_disjoint_and_stratified() -> None:
    splits = digits.digits_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 718, "calibration": 629, "test": 450}
    ids = [set(s.sample_ids) for s in splits.values()]
    assert sum(map(len, ids)) == 1797 and len(set.union(*ids)) == 1797
    for split in splits.values():
        assert split.images.dtype == np.float32 and split.images.shape[1:] == (8, 8)
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert np.bincount(split.labels, minlength=10).min() > 0.08 * len(split)
        assert not split.images.flags.writeable


def test_loader_batches_have_the_extraction_keys() -> None:
    batch = next(iter(digits.digits_loader("calibration", batch_size=7)))
    assert set(batch) == {"image", "label", "sample_id"}
    assert batch["image"].shape == (7, 8, 8) and batch["label"].dtype == torch.int64 and len(batch["sample_id"]) == 7
    with pytest.raises(ValueError, match="'split' parameter must be one of"):
        digits.digits_loader("validation")
    with pytest.raises(ValueError, match="'batch_size' parameter must be a positive integer"):
        digits.digits_loader(batch_size=0)


def test_query_batches_mix_clean_corrupted_and_ood_samples() -> None:
    batches = digits.query_batches(n_batches=3, seed=0)
    assert list(batches) == ["batch-000", "batch-001", "batch-002"]
    all_ids = np.concatenate([b.sample_ids for b in batches.values()])
    assert len(set(all_ids)) == len(all_ids) == 750
    kinds = pd.Series([digits.sample_kind(s) for s in all_ids]).value_counts()
    assert kinds["digit"] == 450 and all(kinds[k] == 75 for k in ("noisy", "rotated", "shape", "photo"))
    again = digits.query_batches(n_batches=3, seed=0)
    assert all(np.array_equal(again[k].images, batches[k].images) for k in batches)
    other = digits.query_batches(n_batches=3, seed=1)
    assert not np.array_equal(other["batch-000"].images, batches["batch-000"].images)
    loaders = digits.query_loaders(n_batches=2, batch_size=64)
    first = next(iter(loaders["batch-000"]))
    assert set(first) == {"image", "sample_id"}  # query data carry no labels
    with pytest.raises(ValueError, match="'corrupted_fraction' parameter"):
        digits.query_batches(corrupted_fraction=1.0)


def test_rejection_by_kind() -> None:
    table = pd.DataFrame({"sample_id": ["digit-1", "noisy-digit-1", "photo-0-0-001", "digit-2"], "selected": [True, False, False, False]})
    result = digits.rejection_by_kind(table)
    assert list(result.index) == ["digit", "noisy", "photo"]
    assert result.loc["digit", "rejection_rate"] == 0.5 and result.loc["photo", "rejected"] == 1
    with pytest.raises(ValueError, match="must have columns"):
        digits.rejection_by_kind(table.drop(columns="selected"))


@pytest.mark.slow
def test_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    first = digits.digits_model(cache_dir=tmp_path, epochs=3)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    path = digits.weights_file(tmp_path, epochs=3)
    assert path.is_file() and path.suffix == ".safetensors"
    retrained = digits.train_digits_model(digits.TrainConfig(epochs=3))
    for name, value in first.state_dict().items():
        assert torch.equal(value, retrained.state_dict()[name]), name  # bit for bit

    stamp = path.stat().st_mtime_ns
    cached = digits.digits_model(cache_dir=tmp_path, epochs=3)
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not retrained
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), cached.state_dict().values(), strict=True))

    other = digits.weights_file(tmp_path, epochs=4)
    assert other != path  # another setting, another fingerprint: retrains

    path.write_bytes(path.read_bytes()[:100])  # a truncated file is not trusted
    repaired = digits.digits_model(cache_dir=tmp_path, epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), repaired.state_dict().values(), strict=True))
    assert load_tensors(path)[1]["fingerprint"] == digits.TrainConfig(epochs=3).fingerprint()


@pytest.mark.slow
def test_the_trained_model_is_good_and_confident_on_clean_digits(tmp_path: Path) -> None:
    model = digits.digits_model(cache_dir=tmp_path)
    accuracy = digits.accuracy_by_split(model)
    assert accuracy["train"] > 0.99 and accuracy["test"] > 0.95 and accuracy["calibration"] > 0.93


def test_weights_file_roundtrip_and_validation(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = save_tensors(tmp_path / "w.safetensors", tensors, {"note": "x"})
    loaded, meta = load_tensors(path)
    assert meta == {"note": "x"} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    header["a"]["data_offsets"] = [0, 10**6]
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + size :])
    with pytest.raises(ValueError, match="inconsistent shape"):
        load_tensors(bad)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "pickle.safetensors")
    with pytest.raises(ValueError, match="existing tensor file"):
        load_tensors(tmp_path / "missing")


# ----------------------------------------------------------------------------- the confidence head (issue 11.5)


def test_the_hint_loss_equals_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits, c_logit = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    labels, hints = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    task, penalty = digits.confidence_hint_loss(logits, c_logit, labels, hints)
    p = np.exp(logits.double().numpy())
    p /= p.sum(axis=1, keepdims=True)
    c = 1.0 / (1.0 + np.exp(-c_logit.double().numpy()))
    asked = np.where(hints.numpy() == 1, c, 1.0)  # no hint: the prediction as it is
    adjusted = asked * p[np.arange(6), labels.numpy()] + (1.0 - asked)  # p'_y = c p_y + (1 - c)
    assert float(task) == pytest.approx(-np.log(adjusted).mean(), rel=1e-6)
    assert float(penalty) == pytest.approx(-np.log(c).mean(), rel=1e-6)


@pytest.mark.slow
def test_confidence_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    first = digits.digits_confidence_model(cache_dir=tmp_path, epochs=2)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    again = digits.train_digits_confidence_model(digits.ConfidenceTrainConfig(epochs=2))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name  # bit for bit
    path = digits.confidence_weights_file(tmp_path, epochs=2)
    assert path.is_file() and path != digits.weights_file(tmp_path, epochs=2)
    stamp = path.stat().st_mtime_ns
    cached = digits.digits_confidence_model(cache_dir=tmp_path, epochs=2)
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not retrained
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), cached.state_dict().values(), strict=True))
    assert digits.confidence_weights_file(tmp_path, epochs=2, budget=0.5) != path  # the budget enters the fingerprint
    logits, confidence = first.logits(torch.zeros(3, 8, 8))
    assert logits.shape == (3, 10) and confidence.shape == (3,)
    with pytest.raises(ValueError, match="'budget' parameter must be a positive number"):
        digits.digits_confidence_model(cache_dir=tmp_path, budget=0)


@pytest.mark.slow
def test_the_learned_confidence_separates_out_of_distribution_kinds_better_than_a_coin(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from seapig_core import ConfidenceScore, extract_logits

    model = digits.digits_confidence_model(cache_dir=tmp_path)  # the default settings, trained in seconds
    accuracy = digits.accuracy_by_split(model)
    assert accuracy["test"] > 0.95 and accuracy["calibration"] > 0.93
    loaders = digits.query_loaders(n_batches=3)
    extracted = [extract_logits(model, loader, progress=False) for loader in loaders.values()]
    assert all(e.confidence_head and e.logits.shape[1] == 11 for e in extracted)
    scores = np.concatenate([ConfidenceScore().score(e.logits).numpy() for e in extracted])
    kinds = np.array([digits.sample_kind(s) for e in extracted for s in e.sample_ids])
    clean = kinds == "digit"
    for ood in (("shape", "photo"), ("shape", "photo", "noisy", "rotated")):
        chosen = clean | np.isin(kinds, ood)
        auroc = roc_auc_score(~clean[chosen], scores[chosen])  # higher score: more uncertain
        assert auroc > 0.6, (ood, auroc)  # a modest floor: clearly better than a coin (0.5)
