"""The bundled real example: scikit-learn's digits and a small CNN trained deterministically.

scikit-learn ships the UCI optical digits (1,797 grey 8x8 images of the digits 0-9), so the
example needs no download. It provides

- fixed, stratified splits: ``train`` (40 %), ``calibration`` (35 %) and ``test`` (25 %);
- :class:`DigitsNet`, a small CNN with a ``.logits(x)`` method, trained in a few seconds on
  one CPU thread with fixed seeds and deterministic algorithms, so the same settings give
  bit-identical weights on a given machine;
- :func:`digits_model`, which loads the trained weights from a cache directory (a safetensors
  file, fingerprinted by the training settings, the data and the library version, so any
  change retrains) or trains and caches them;
- query batches (:func:`query_batches`) that mix clean test digits with corrupted and
  out-of-distribution inputs - noisy and rotated digits, synthetic shapes, and patches of
  scikit-learn's bundled photographs - so that rejections mean something. The kind of each
  sample is encoded in its id (:func:`sample_kind`).

The factory functions take only JSON-friendly keyword arguments, so Prefect deployments can
name them by import path, e.g. ``"seapig_core.examples.digits:digits_model"`` and
``"seapig_core.examples.digits:query_loaders"``.

Examples
--------
>>> from seapig_core.examples import digits
>>> model = digits.digits_model(cache_dir="/tmp/seapig-digits")      # doctest: +SKIP
>>> loader = digits.digits_loader("calibration")                      # doctest: +SKIP
>>> batches = digits.query_loaders(n_batches=3)                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seapig_core._io import ensure_writable_dir
from seapig_core._validation import check_positive_int
from seapig_core._version import __version__
from seapig_core.examples._weights import load_tensors, save_tensors

__all__ = [
    "CLASSES",
    "IMAGE_KEY",
    "ID_KEY",
    "LABEL_KEY",
    "DigitsNet",
    "ImageDataset",
    "QueryBatch",
    "Split",
    "TrainConfig",
    "accuracy_by_split",
    "default_cache_dir",
    "digits_loader",
    "digits_model",
    "digits_splits",
    "query_batches",
    "query_loaders",
    "rejection_by_kind",
    "sample_kind",
    "train_digits_model",
    "weights_file",
]

#: Number of classes (the digits 0-9).
CLASSES = 10
#: Batch keys of the example's data loaders.
IMAGE_KEY, LABEL_KEY, ID_KEY = "image", "label", "sample_id"

_SPLIT_SEED = 0
_SPLIT_FRACTIONS = {"train": 0.40, "calibration": 0.35, "test": 0.25}
# Bump when the architecture or the training procedure changes: cached weights then retrain.
_TRAINING_REVISION = 1
_WEIGHTS_FORMAT = "seapig_core.examples.digits"


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """One split of the digits: images in ``[0, 1]``, labels and stable sample ids."""

    images: np.ndarray  # float32 (N, 8, 8), read-only
    labels: np.ndarray  # int64 (N,), read-only
    sample_ids: np.ndarray  # str (N,), "digit-<index in load_digits()>"

    def __len__(self) -> int:
        return len(self.labels)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=1)
def digits_splits() -> dict[str, Split]:
    """The fixed, stratified ``train`` / ``calibration`` / ``test`` splits of scikit-learn's digits.

    Returns
    -------
    dict[str, Split]
        Keys ``"train"``, ``"calibration"``, ``"test"``; 718 / 629 / 450 samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    index = np.arange(len(labels))
    train, rest = train_test_split(
        index, train_size=_SPLIT_FRACTIONS["train"], stratify=labels, random_state=_SPLIT_SEED
    )
    calibration_share = _SPLIT_FRACTIONS["calibration"] / (1.0 - _SPLIT_FRACTIONS["train"])
    calibration, test = train_test_split(
        rest, train_size=calibration_share, stratify=labels[rest], random_state=_SPLIT_SEED
    )
    splits = {}
    for name, idx in (("train", train), ("calibration", calibration), ("test", test)):
        idx = np.sort(idx)
        ids = np.array([f"digit-{i:04d}" for i in idx])
        splits[name] = Split(_readonly(images[idx]), _readonly(labels[idx]), _readonly(ids))
    return splits


@functools.lru_cache(maxsize=1)
def _data_fingerprint() -> str:
    digest = hashlib.sha256()
    for name, split in digits_splits().items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(split.images).tobytes())
        digest.update(split.labels.tobytes())
    return digest.hexdigest()


class ImageDataset(Dataset):
    """Images ``(N, 8, 8)`` with sample ids and, optionally, labels, as dict items.

    Each item is ``{"image": float32 (8, 8), "sample_id": str}`` plus ``"label": int64`` when
    labels are given; the default collate function batches them into a dict.
    """

    def __init__(self, images: np.ndarray, sample_ids: np.ndarray, labels: np.ndarray | None = None) -> None:
        if len(images) != len(sample_ids) or (labels is not None and len(labels) != len(images)):
            raise ValueError(
                f"ImageDataset needs as many images, sample ids and labels. "
                f"Got {len(images)}, {len(sample_ids)} and {None if labels is None else len(labels)} instead."
            )
        self.images = torch.from_numpy(np.array(images, dtype=np.float32))
        self.sample_ids = [str(s) for s in sample_ids]
        self.labels = None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {IMAGE_KEY: self.images[i], ID_KEY: self.sample_ids[i]}
        if self.labels is not None:
            item[LABEL_KEY] = self.labels[i]
        return item




def digits_loader(split: str = "calibration", batch_size: int = 128) -> DataLoader:
    """A labelled DataLoader over one split of the digits (in order, no shuffling).

    Parameters
    ----------
    split : {"train", "calibration", "test"}
        Which split.
    batch_size : int
        Samples per batch.

    Returns
    -------
    torch.utils.data.DataLoader
        Batches ``{"image": (B, 8, 8), "label": (B,), "sample_id": list[str]}``.
    """
    splits = digits_splits()
    if split not in splits:
        raise ValueError(f"The 'split' parameter must be one of {sorted(splits)}. Got {split!r} instead.")
    data = splits[split]
    dataset = ImageDataset(data.images, data.sample_ids, data.labels)
    return DataLoader(dataset, batch_size=check_positive_int(batch_size, "batch_size"), shuffle=False)


# ----------------------------------------------------------------------------- query batches


@dataclass(frozen=True)
class QueryBatch:
    """Unlabelled query images and their ids; the id's prefix names the sample's kind."""

    images: np.ndarray  # float32 (N, 8, 8)
    sample_ids: np.ndarray  # str (N,)


#: Sample kinds in the query batches, by id prefix.
QUERY_KINDS = {
    "digit": "clean test digit",
    "noisy": "test digit with strong Gaussian noise",
    "rotated": "test digit rotated by 90 degrees",
    "shape": "synthetic shape (out of distribution)",
    "photo": "patch of a photograph (out of distribution)",
}


def sample_kind(sample_id: str) -> str:
    """The kind of a query sample from its id, e.g. ``"noisy"`` for ``"noisy-digit-0042"``."""
    return str(sample_id).split("-", 1)[0]


@functools.lru_cache(maxsize=1)
def _photo_pool() -> np.ndarray:
    """Grey 8x8 patches (block means of 48x48 crops) of scikit-learn's two bundled photos."""
    from sklearn.datasets import load_sample_images

    patches = []
    for image in load_sample_images().images:
        grey = image.astype(np.float32).mean(axis=2) / 255.0
        h, w = (s - s % 48 for s in grey.shape)
        blocks = grey[:h, :w].reshape(h // 48, 48, w // 48, 48).transpose(0, 2, 1, 3).reshape(-1, 48, 48)
        small = blocks.reshape(-1, 8, 6, 8, 6).mean(axis=(2, 4))
        low, high = small.min(axis=(1, 2), keepdims=True), small.max(axis=(1, 2), keepdims=True)
        patches.append((small - low) / np.maximum(high - low, 1e-6))  # stretch contrast like the digits
    return _readonly(np.concatenate(patches).astype(np.float32))


def _shape(rng: np.random.Generator) -> np.ndarray:
    """A random synthetic shape on an 8x8 canvas: a box outline, a disc, a cross or bars."""
    canvas = np.zeros((8, 8), dtype=np.float32)
    kind = rng.integers(4)
    if kind == 0:
        top, left = rng.integers(0, 3, size=2)
        bottom, right = rng.integers(5, 8, size=2)
        canvas[top : bottom + 1, [left, right]] = 1.0
        canvas[[top, bottom], left : right + 1] = 1.0
    elif kind == 1:
        yy, xx = np.mgrid[0:8, 0:8]
        cy, cx = rng.uniform(2.5, 4.5, size=2)
        canvas[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2.0, 9.0)] = 1.0
    elif kind == 2:
        canvas[np.arange(8), np.arange(8)] = 1.0
        canvas[np.arange(8), 7 - np.arange(8)] = 1.0
    else:
        step = int(rng.integers(2, 4))
        canvas[::step, :] = 1.0
        if rng.integers(2):
            canvas = canvas.T.copy()
    return canvas * rng.uniform(0.6, 1.0)


def query_batches(n_batches: int = 3, seed: int = 0, corrupted_fraction: float = 0.4) -> dict[str, QueryBatch]:
    """Query batches mixing clean test digits with corrupted and out-of-distribution inputs.

    The test split is cut into ``n_batches`` parts. Batch ``b`` holds its part's clean digits
    and, making up ``corrupted_fraction`` of the batch in about equal numbers, noisy digits
    (Gaussian noise, sigma 0.35, clipped to [0, 1]), digits rotated by 90 degrees, synthetic
    shapes and photo patches. Order within a batch is shuffled; everything is seeded.

    Parameters
    ----------
    n_batches : int
        Number of batches, named ``"batch-000"``, ``"batch-001"``, ...
    seed : int
        Seed of the corruptions and the order.
    corrupted_fraction : float
        Share of non-clean samples in each batch, in [0, 1).

    Returns
    -------
    dict[str, QueryBatch]
    """
    n_batches = check_positive_int(n_batches, "n_batches")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"The 'seed' parameter must be a non-negative integer. Got {seed!r} instead.")
    if not (isinstance(corrupted_fraction, (int, float)) and 0.0 <= corrupted_fraction < 1.0):
        raise ValueError(f"The 'corrupted_fraction' parameter must be in [0, 1). Got {corrupted_fraction!r} instead.")
    test = digits_splits()["test"]
    if n_batches > len(test):
        raise ValueError(f"The 'n_batches' parameter must be at most {len(test)}. Got {n_batches} instead.")
    photos = _photo_pool()
    batches = {}
    for b, part in enumerate(np.array_split(np.arange(len(test)), n_batches)):
        rng = np.random.default_rng([int(seed), b])
        n_extra = int(round(len(part) * corrupted_fraction / (1.0 - corrupted_fraction)))
        counts = np.bincount(np.arange(n_extra) % 4, minlength=4)
        images = [test.images[part]]
        ids = [test.sample_ids[part]]
        noisy = rng.choice(part, size=counts[0], replace=False)
        images.append(np.clip(test.images[noisy] + rng.normal(0.0, 0.35, size=(counts[0], 8, 8)), 0.0, 1.0))
        ids.append(np.array([f"noisy-{s}" for s in test.sample_ids[noisy]]))
        rotated = rng.choice(part, size=counts[1], replace=False)
        images.append(np.rot90(test.images[rotated], k=1, axes=(1, 2)))
        ids.append(np.array([f"rotated-{s}" for s in test.sample_ids[rotated]]))
        images.append(np.stack([_shape(rng) for _ in range(counts[2])]) if counts[2] else np.empty((0, 8, 8)))
        ids.append(np.array([f"shape-{seed}-{b}-{j:03d}" for j in range(counts[2])]))
        chosen = rng.choice(len(photos), size=counts[3], replace=False)
        images.append(photos[chosen])
        ids.append(np.array([f"photo-{seed}-{b}-{j:03d}" for j in range(counts[3])]))
        order = rng.permutation(sum(len(i) for i in ids))
        batch_images = np.concatenate(images).astype(np.float32)[order]
        batch_ids = np.concatenate(ids)[order]
        batches[f"batch-{b:03d}"] = QueryBatch(_readonly(batch_images), _readonly(batch_ids))
    return batches


def query_loaders(
    n_batches: int = 3, seed: int = 0, corrupted_fraction: float = 0.4, batch_size: int = 128
) -> dict[str, DataLoader]:
    """Unlabelled DataLoaders over :func:`query_batches`, one per query batch, by batch name.

    Batches are ``{"image": (B, 8, 8), "sample_id": list[str]}``.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    return {
        name: DataLoader(ImageDataset(batch.images, batch.sample_ids), batch_size=batch_size, shuffle=False)
        for name, batch in query_batches(n_batches, seed, corrupted_fraction).items()
    }


def rejection_by_kind(selections: pd.DataFrame) -> pd.DataFrame:
    """Samples, rejected samples and rejection rate per sample kind of a selections table.

    Parameters
    ----------
    selections : pandas.DataFrame
        With columns ``sample_id`` and ``selected`` (see :mod:`seapig_core.selections`).

    Returns
    -------
    pandas.DataFrame
        Indexed by kind, columns ``samples``, ``rejected``, ``rejection_rate``.
    """
    missing = {"sample_id", "selected"} - set(selections.columns)
    if missing:
        raise ValueError(f"The 'selections' parameter must have columns {sorted(missing)}. Got {list(selections.columns)}.")
    kinds = selections["sample_id"].map(sample_kind)
    rejected = ~selections["selected"].astype(bool)
    table = pd.DataFrame({"samples": kinds.value_counts(), "rejected": rejected.groupby(kinds).sum()}).fillna(0)
    table = table.astype({"samples": "int64", "rejected": "int64"})
    table["rejection_rate"] = table["rejected"] / table["samples"]
    order = [k for k in QUERY_KINDS if k in table.index] + [k for k in table.index if k not in QUERY_KINDS]
    return table.loc[order].rename_axis("kind")


# ----------------------------------------------------------------------------- model


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions, max-pooling, two dense layers.

    Parameters
    ----------
    width : int
        Channels of the first convolution (the second has twice as many).
    n_classes : int
        Output logits.
    """

    def __init__(self, width: int = 16, n_classes: int = CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, 8, 8)`` or ``(B, 1, 8, 8)``."""
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, the method seapig_core's extraction calls."""
        return self.forward(x)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_digits_model`; all of them enter the weights' fingerprint."""

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0

    def fingerprint(self) -> str:
        """SHA-256 of the settings, the data, the training revision and the library version."""
        payload = {
            "config": asdict(self),
            "data": _data_fingerprint(),
            "revision": _TRAINING_REVISION,
            "library_version": __version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[torch.Generator]:
    """One thread, deterministic algorithms and a forked RNG; restores the caller's settings."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch.Generator().manual_seed(seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train_digits_model(config: TrainConfig | None = None) -> DigitsNet:
    """Train :class:`DigitsNet` on the ``train`` split, deterministically (a few seconds on a CPU).

    Adam with weight decay on the cross-entropy, fixed seeds for initialisation and shuffling,
    one thread and ``torch.use_deterministic_algorithms``: the same ``config`` gives the same
    weights bit for bit on a given machine and torch build. The caller's RNG state, thread count
    and determinism setting are restored afterwards.

    Returns
    -------
    DigitsNet
        In eval mode.
    """
    config = config or TrainConfig()
    train = digits_splits()["train"]
    x = torch.from_numpy(np.array(train.images)).unsqueeze(1)
    y = torch.from_numpy(np.array(train.labels))
    with _deterministic(config.seed) as generator:
        model = DigitsNet(width=config.width)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(config.epochs):
            for batch in torch.randperm(len(y), generator=generator).split(config.batch_size):
                optimiser.zero_grad()
                loss_fn(model(x[batch]), y[batch]).backward()
                optimiser.step()
    return model.eval()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/seapig-core/digits`` (``~/.cache/seapig-core/digits`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seapig-core" / "digits"


def _weights_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / f"digits-cnn-{fingerprint[:16]}.safetensors"


def _load_cached(path: Path, fingerprint: str, config: TrainConfig) -> DigitsNet | None:
    """The cached model if ``path`` holds weights with this exact fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors(path)
    except ValueError:
        return None
    if metadata.get("format") != _WEIGHTS_FORMAT or metadata.get("fingerprint") != fingerprint:
        return None
    model = DigitsNet(width=config.width)
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        return None
    model.load_state_dict(tensors)
    return model.eval()


def digits_model(
    cache_dir: str | os.PathLike[str] | None = None, retrain: bool = False, epochs: int = 30, seed: int = 0
) -> DigitsNet:
    """The trained digits CNN: cached weights when their fingerprint matches, else trained and cached.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Directory of the weights file ``digits-cnn-<fingerprint>.safetensors`` (created if
        needed); default :func:`default_cache_dir`.
    retrain : bool
        Train even if matching weights are cached (and replace them).
    epochs, seed : int
        Training settings (see :class:`TrainConfig`); they enter the fingerprint.

    Returns
    -------
    DigitsNet
        In eval mode.
    """
    config = TrainConfig(epochs=check_positive_int(epochs, "epochs"), seed=int(seed))
    directory = ensure_writable_dir(default_cache_dir() if cache_dir is None else cache_dir, "cache_dir")
    fingerprint = config.fingerprint()
    path = _weights_path(directory, fingerprint)
    if not retrain and (model := _load_cached(path, fingerprint, config)) is not None:
        return model
    model = train_digits_model(config)
    metadata = {
        "format": _WEIGHTS_FORMAT,
        "fingerprint": fingerprint,
        "library_version": __version__,
        "config": json.dumps(asdict(config), sort_keys=True),
        "torch_version": torch.__version__,
    }
    save_tensors(path, model.state_dict(), metadata)
    return model


def weights_file(cache_dir: str | os.PathLike[str] | None = None, epochs: int = 30, seed: int = 0) -> Path:
    """Where :func:`digits_model` keeps the weights for these settings (the file may not exist yet)."""
    directory = Path(default_cache_dir() if cache_dir is None else cache_dir)
    return _weights_path(directory, TrainConfig(epochs=epochs, seed=seed).fingerprint())


def accuracy_by_split(model: nn.Module) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on each split, e.g. ``{"train": 1.0, "calibration": 0.97, ...}``."""
    result = {}
    with torch.no_grad():
        for name, data in digits_splits().items():
            logits = model(torch.from_numpy(np.array(data.images)))
            result[name] = float((logits.argmax(dim=1).numpy() == data.labels).mean())
    return result
