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
- :class:`DigitsConfidenceNet`, the same CNN with a second, learned-confidence branch (DeVries
  and Taylor, "Learning Confidence for Out-of-Distribution Detection in Neural Networks",
  2018), trained with their hint loss (:func:`confidence_hint_loss`) and its budget, just as
  deterministically and quickly; :func:`digits_confidence_model` caches it like the first.
  Its ``.logits(x)`` returns ``(class logits, confidence logit)``, which extraction stores as
  ``(N, 11)`` logits with the confidence as the last unit (``confidence_head=True``; see
  :mod:`seapig_core.layout`);
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
>>> confident = digits.digits_confidence_model(cache_dir="/tmp/seapig-digits")  # doctest: +SKIP
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
import torch.nn.functional as F
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
    "ConfidenceTrainConfig",
    "DigitsConfidenceNet",
    "DigitsNet",
    "ImageDataset",
    "QueryBatch",
    "Split",
    "TrainConfig",
    "accuracy_by_split",
    "compare_rejections_by_kind",
    "confidence_hint_loss",
    "confidence_weights_file",
    "default_cache_dir",
    "digits_confidence_model",
    "digits_loader",
    "digits_model",
    "digits_splits",
    "query_batches",
    "query_loaders",
    "rejection_by_kind",
    "sample_kind",
    "train_digits_confidence_model",
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


def compare_rejections_by_kind(selections: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rejection rates per sample kind of several selectors that scored the same query samples.

    Parameters
    ----------
    selections : dict of str to pandas.DataFrame
        Selections tables (columns ``sample_id`` and ``selected``) by selector name, e.g.
        ``{"softmax": ..., "confidence head": ...}``; each must hold the same sample ids.

    Returns
    -------
    pandas.DataFrame
        Indexed by kind: ``samples``, then one column per selector with its rejection rate.

    Raises
    ------
    ValueError
        If no table is given, or the tables hold different samples.
    """
    if not selections:
        raise ValueError("The 'selections' parameter must hold at least one selections table. Got none.")
    tables = {name: rejection_by_kind(table) for name, table in selections.items()}
    first_name, first = next(iter(tables.items()))
    ids = {name: set(table["sample_id"]) for name, table in selections.items()}
    for name in tables:
        if ids[name] != ids[first_name]:
            raise ValueError(
                f"The 'selections' parameter must hold tables of the same samples. Got {name!r} with "
                f"{len(ids[name])} sample ids and {first_name!r} with {len(ids[first_name])}, not the same."
            )
    out = first[["samples"]].copy()
    for name, table in tables.items():
        out[name] = table["rejection_rate"].reindex(out.index)
    return out


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


def _load_cached(path: Path, fingerprint: str, config: TrainConfig, build: type[nn.Module] = DigitsNet) -> Any:
    """The cached model (of class ``build``) if ``path`` holds weights with this exact fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors(path)
    except ValueError:
        return None
    if metadata.get("format") != _WEIGHTS_FORMAT or metadata.get("fingerprint") != fingerprint:
        return None
    model = build(width=config.width)
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
    path = _weights_path(directory, config.fingerprint())
    return _cached_model(path, config, DigitsNet, train_digits_model, retrain)


def weights_file(cache_dir: str | os.PathLike[str] | None = None, epochs: int = 30, seed: int = 0) -> Path:
    """Where :func:`digits_model` keeps the weights for these settings (the file may not exist yet)."""
    directory = Path(default_cache_dir() if cache_dir is None else cache_dir)
    return _weights_path(directory, TrainConfig(epochs=epochs, seed=seed).fingerprint())


# ----------------------------------------------------------------------------- confidence model


class DigitsConfidenceNet(nn.Module):
    """:class:`DigitsNet` with a learned confidence branch (DeVries and Taylor 2018).

    The same convolutions and hidden layer, then two heads on the 64 hidden units: the class
    logits, and one unit whose sigmoid is the network's confidence that its prediction is
    right (trained with :func:`confidence_hint_loss`).

    Parameters
    ----------
    width : int
        Channels of the first convolution (the second has twice as many).
    n_classes : int
        Class logits.
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
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU())
        self.classifier = nn.Linear(64, n_classes)
        self.confidence_branch = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, n_classes), confidence logit (B,))`` of images ``(B, 8, 8)`` or ``(B, 1, 8, 8)``.

        The confidence logit is the branch's output before its sigmoid.
        """
        if x.ndim == 3:
            x = x.unsqueeze(1)
        h = self.hidden(self.features(x))
        return self.classifier(h), self.confidence_branch(h).squeeze(1)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, confidence logit)``: seapig_core's extraction stores them as ``(B, n_classes + 1)``."""
        return self.forward(x)


def confidence_hint_loss(
    logits: torch.Tensor,
    confidence_logit: torch.Tensor,
    labels: torch.Tensor,
    hints: torch.Tensor,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of DeVries and Taylor's hint loss, ``(task loss, confidence loss)``.

    With ``p = softmax(logits)``, ``c = sigmoid(confidence_logit)`` (both clamped to
    ``[eps, 1 - eps]``) and ``y`` the one-hot labels, the network may ask for hints: its
    prediction is moved towards the label in proportion to its lack of confidence,
    ``p' = c p + (1 - c) y``, and it pays ``-log c`` for that. Hints are given only to the
    samples where ``hints`` is 1 (the paper draws it from Bernoulli(1/2), so that the network
    cannot rely on them); elsewhere ``c`` is taken as 1. The training objective is
    ``task + lambda * confidence`` (see :func:`train_digits_confidence_model` for ``lambda``
    and its budget).

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, C)`` class logits.
    confidence_logit : torch.Tensor
        ``(B,)`` the confidence branch's logit.
    labels : torch.Tensor
        ``(B,)`` int64 class indices.
    hints : torch.Tensor
        ``(B,)`` 0/1: 1 where the sample may receive a hint.
    eps : float
        Clamp of the probabilities, for the logarithms.

    Returns
    -------
    task : torch.Tensor
        Scalar ``mean(-log p'_y)``.
    confidence : torch.Tensor
        Scalar ``mean(-log c)`` (over all samples).
    """
    p = logits.softmax(dim=1).clamp(eps, 1.0 - eps)
    c = torch.sigmoid(confidence_logit).clamp(eps, 1.0 - eps)
    asked = (c * hints + (1.0 - hints)).unsqueeze(1)
    onehot = F.one_hot(labels, logits.shape[1]).to(p.dtype)
    adjusted = asked * p + (1.0 - asked) * onehot
    return F.nll_loss(torch.log(adjusted), labels), -torch.log(c).mean()


@dataclass(frozen=True)
class ConfidenceTrainConfig(TrainConfig):
    """Settings of :func:`train_digits_confidence_model`; all enter the weights' fingerprint.

    Attributes (besides :class:`TrainConfig`'s)
    ------------------------------------------
    budget : float
        The hint loss's budget ``beta`` (DeVries and Taylor use 0.3): after each step
        ``lambda`` grows (``/ 0.99``) while the confidence loss ``mean(-log c)`` is at or above
        it and shrinks (``/ 1.01``) below it, so that the network spends about ``beta`` nats
        of confidence on hints.
    initial_lambda : float
        ``lambda`` at the start (0.1 in the paper).
    max_shift : int
        Random translation of each training image by up to this many pixels (0: none). Without
        it the network fits its 718 training digits perfectly within a few epochs, after which
        no hint helps the task loss and the confidence branch learns nothing (its AUROC against
        out-of-distribution inputs stays at a coin's); with it, hard training inputs keep
        coming.
    """

    budget: float = 0.3
    initial_lambda: float = 0.1
    max_shift: int = 1


def _shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image ``(B, 1, 8, 8)`` translated by a random offset in ``[-max_shift, max_shift]``^2 (zero fill)."""
    if max_shift == 0:
        return images
    k = 2 * max_shift + 1
    padded = F.pad(images, (max_shift,) * 4)
    crops = torch.stack([padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(k) for dx in range(k)])
    offsets = torch.randint(0, k * k, (images.shape[0],), generator=generator)
    return crops[offsets, torch.arange(images.shape[0])]


def train_digits_confidence_model(config: ConfidenceTrainConfig | None = None) -> DigitsConfidenceNet:
    """Train :class:`DigitsConfidenceNet` with the hint loss, deterministically (seconds on a CPU).

    Adam with weight decay on ``task + lambda * confidence`` of :func:`confidence_hint_loss`,
    hints for a Bernoulli(1/2) half of each batch, ``lambda`` adjusted to the budget after
    every step (:class:`ConfidenceTrainConfig`), and randomly shifted training images. Fixed
    seeds, one thread and deterministic algorithms as in :func:`train_digits_model`: the same
    ``config`` gives the same weights bit for bit on a given machine and torch build; the
    caller's RNG state, thread count and determinism setting are restored.

    Returns
    -------
    DigitsConfidenceNet
        In eval mode.
    """
    config = config or ConfidenceTrainConfig()
    train = digits_splits()["train"]
    x = torch.from_numpy(np.array(train.images)).unsqueeze(1)
    y = torch.from_numpy(np.array(train.labels))
    with _deterministic(config.seed) as generator:
        model = DigitsConfidenceNet(width=config.width)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        lmbda = config.initial_lambda
        model.train()
        for _ in range(config.epochs):
            for batch in torch.randperm(len(y), generator=generator).split(config.batch_size):
                optimiser.zero_grad()
                logits, confidence = model(_shifted(x[batch], config.max_shift, generator))
                hints = torch.bernoulli(torch.full((len(batch),), 0.5), generator=generator)
                task, penalty = confidence_hint_loss(logits, confidence, y[batch], hints)
                (task + lmbda * penalty).backward()
                optimiser.step()
                lmbda = lmbda / 1.01 if config.budget > float(penalty.detach()) else lmbda / 0.99
    return model.eval()


def confidence_weights_file(
    cache_dir: str | os.PathLike[str] | None = None, epochs: int = 30, seed: int = 0, budget: float = 0.3
) -> Path:
    """Where :func:`digits_confidence_model` keeps the weights for these settings (the file may not exist yet)."""
    directory = Path(default_cache_dir() if cache_dir is None else cache_dir)
    config = ConfidenceTrainConfig(epochs=epochs, seed=seed, budget=budget)
    return directory / f"digits-confidence-cnn-{config.fingerprint()[:16]}.safetensors"


def digits_confidence_model(
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    epochs: int = 30,
    seed: int = 0,
    budget: float = 0.3,
) -> DigitsConfidenceNet:
    """The trained digits CNN with a confidence branch: cached weights when their fingerprint matches, else trained and cached.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Directory of the weights file ``digits-confidence-cnn-<fingerprint>.safetensors``
        (created if needed); default :func:`default_cache_dir`.
    retrain : bool
        Train even if matching weights are cached (and replace them).
    epochs, seed : int
        Training settings (see :class:`ConfidenceTrainConfig`); they enter the fingerprint.
    budget : float
        The hint loss's budget (see :class:`ConfidenceTrainConfig`).

    Returns
    -------
    DigitsConfidenceNet
        In eval mode; ``.logits(x)`` returns ``(logits, confidence logit)``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) < float("inf"):
        raise ValueError(f"The 'budget' parameter must be a positive number. Got {budget!r} instead.")
    config = ConfidenceTrainConfig(epochs=check_positive_int(epochs, "epochs"), seed=int(seed), budget=float(budget))
    directory = ensure_writable_dir(default_cache_dir() if cache_dir is None else cache_dir, "cache_dir")
    path = confidence_weights_file(directory, config.epochs, config.seed, config.budget)
    return _cached_model(path, config, DigitsConfidenceNet, train_digits_confidence_model, retrain)


def _cached_model(path: Path, config: TrainConfig, build: type[nn.Module], train: Any, retrain: bool) -> Any:
    """The model of ``build`` cached at ``path`` for ``config``, or trained with ``train(config)`` and cached."""
    fingerprint = config.fingerprint()
    if not retrain and (model := _load_cached(path, fingerprint, config, build)) is not None:
        return model
    model = train(config)
    metadata = {
        "format": _WEIGHTS_FORMAT,
        "fingerprint": fingerprint,
        "library_version": __version__,
        "config": json.dumps(asdict(config), sort_keys=True),
        "torch_version": torch.__version__,
    }
    save_tensors(path, model.state_dict(), metadata)
    return model


def accuracy_by_split(model: nn.Module) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on each split, e.g. ``{"train": 1.0, "calibration": 0.97, ...}``.

    For a model whose output is ``(logits, confidence logit)``, of its logits.
    """
    result = {}
    with torch.no_grad():
        for name, data in digits_splits().items():
            logits = model(torch.from_numpy(np.array(data.images)))
            if isinstance(logits, tuple):
                logits = logits[0]
            result[name] = float((logits.argmax(dim=1).numpy() == data.labels).mean())
    return result
