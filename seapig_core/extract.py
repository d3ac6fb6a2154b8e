"""Run a model over a DataLoader and collect its logits, labels and sample ids, in order.

:func:`extract_logits` is the one place that does this; ``LogitScore.fit(model=, loader=)``
and the pipeline's extraction task both call it.

The model must be a ``torch.nn.Module`` with a callable ``logits(x)`` method returning a
tensor whose first axis is the batch (e.g. ``(B, C)`` for multiclass). A module without one
raises a ``TypeError``; wrap it::

    class WithLogits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def logits(self, x):
            return self.net(x)

Batches may be

- a tensor: the input;
- a tuple or list ``(x,)``, ``(x, y)`` or ``(x, y, ids)`` (what ``TensorDataset`` yields);
- a mapping: the input under ``input_key`` (default: the one of ``image``, ``input``, ``x``,
  ``inputs``, ``images`` present), labels under ``label_key`` (default ``label``, ``y``,
  ``target``, ``labels``, ``targets``), ids under ``id_key`` (default ``id``, ``sample_id``,
  ``ids``, ``sample_ids``). Integer keys index tuple/list batches instead of the positional
  form: the input is then at ``input_key`` (default 0), labels and ids only where given.

**A learned confidence head** (DeVries and Taylor 2018): a model trained to output its own
confidence next to its class logits returns the *tuple* ``(logits, confidence_logit)`` from
``logits(x)``, in one forward pass, where ``confidence_logit`` is the confidence branch's logit
before its sigmoid, shaped like the logits without their unit axis (axis 1): ``(B,)`` or
``(B, 1)`` beside ``(B, C)`` logits, ``(B, M)`` or ``(B, 1, M)`` beside ``(B, C, M)``. It is
stored as one more unit of axis 1, ``(N, C + 1)`` (``(N, C + 1, M)``), which is what
``confidence_head=True`` expects everywhere (:mod:`seapig_core.layout`); ``Extraction.confidence_head``
and the store entry's manifest (``layout``) say so. A model with separate ``logits(x)`` and
``confidence(x)`` methods is not read as having a confidence head (a method of that name may
mean anything): wrap it in a module whose ``logits(x)`` returns both::

    class WithConfidence(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def logits(self, x):
            return self.net.logits(x), self.net.confidence(x)

The input is passed to ``model.logits`` as is: a tensor, or a dict/list/tuple of tensors
(moved to the model's device). Sample ids default to the running index ``0..N-1``; batch ids
may be integers or strings.

Extraction runs under ``torch.inference_mode()`` with the model in eval mode, and restores
every submodule's training flag afterwards, also on error. Each batch's logits come back to
the CPU as float32 before the next batch runs, so nothing accumulates on the accelerator.

With ``outdir``, results go to the fingerprinted logits store (:mod:`seapig_core.store`,
which documents the fingerprint, the cache policy and how to force a refresh): batches stream to
disk in chunks, so memory stays bounded, and the result is the store entry, read chunk by chunk
(``Extraction.stored.iter_chunks``) or materialised on first access to ``logits``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seapig_core import store
from seapig_core._io import check_file_stem, ensure_writable_dir
from seapig_core._validation import check_sample_ids
from seapig_core._version import __version__

__all__ = ["DEFAULT_ID_KEYS", "DEFAULT_INPUT_KEYS", "DEFAULT_LABEL_KEYS", "Extraction", "extract_logits"]

DEFAULT_INPUT_KEYS: tuple[str, ...] = ("image", "input", "x", "inputs", "images")
DEFAULT_LABEL_KEYS: tuple[str, ...] = ("label", "y", "target", "labels", "targets")
DEFAULT_ID_KEYS: tuple[str, ...] = ("id", "sample_id", "ids", "sample_ids")

ProgressCallback = Callable[[int, "int | None"], Any]



class Extraction:
    """What :func:`extract_logits` returns.

    Without ``outdir`` the logits, labels and ids are in memory. With ``outdir`` the result is
    the store entry (:attr:`stored`), opened in milliseconds; ``logits``, ``labels`` and
    ``sample_ids`` are then materialised (and verified) on first access, and
    ``stored.iter_chunks(max_rows)`` reads the entry chunk by chunk in bounded memory instead.

    Attributes
    ----------
    logits : torch.Tensor
        CPU float32, ``(N, *trailing)`` in the model's output shape; an ordinary in-memory tensor.
        With a confidence head, its logit is the last unit of axis 1: ``(N, C + 1)``.
    labels : torch.Tensor or None
        ``(N, ...)`` labels from the batches, or None when the batches carry none.
    sample_ids : numpy.ndarray
        ``(N,)``: int64 running index by default, else the batches' ids (int64, or an object
        array of str).
    n_samples : int
        N (known without materialising anything).
    from_cache : bool
        Whether the result was served from the store without running the model.
    stored : seapig_core.store.StoredLogits or None
        The store entry, or None without ``outdir``.
    path : pathlib.Path or None
        The store's data file, or None without ``outdir``.
    fingerprint : str or None
        The store entry's fingerprint key, or None without ``outdir``.
    confidence_head : bool
        Whether the model returned a confidence logit beside its logits (stored as their last
        unit; see the module docstring).
    """

    __slots__ = ("_confidence_head", "_memory", "from_cache", "stored")

    def __init__(
        self,
        memory: tuple[torch.Tensor, torch.Tensor | None, np.ndarray] | None = None,
        *,
        stored: store.StoredLogits | None = None,
        from_cache: bool = False,
        confidence_head: bool = False,
    ) -> None:
        if (memory is None) == (stored is None):
            raise TypeError("Extraction holds either in-memory results or a store entry, exactly one.")
        self._memory = memory
        self.stored = stored
        self.from_cache = from_cache
        self._confidence_head = bool(confidence_head)

    def __repr__(self) -> str:
        where = "memory" if self.stored is None else repr(str(self.stored.path))
        return f"Extraction(n_samples={self.n_samples}, from_cache={self.from_cache}, in={where})"

    @property
    def logits(self) -> torch.Tensor:
        """The logits (read from the store on first access)."""
        return self._memory[0] if self._memory is not None else self.stored.logits

    @property
    def labels(self) -> torch.Tensor | None:
        """The labels, or None (read from the store on first access)."""
        return self._memory[1] if self._memory is not None else self.stored.labels

    @property
    def sample_ids(self) -> np.ndarray:
        """The sample ids (read from the store on first access)."""
        return self._memory[2] if self._memory is not None else self.stored.sample_ids

    @property
    def n_samples(self) -> int:
        """N, the number of samples."""
        return int(self._memory[0].shape[0]) if self._memory is not None else self.stored.n_samples

    @property
    def path(self) -> Path | None:
        """The store's data file, or None without ``outdir``."""
        return None if self.stored is None else self.stored.path

    @property
    def fingerprint(self) -> str | None:
        """The store entry's fingerprint key, or None without ``outdir``."""
        return None if self.stored is None else self.stored.fingerprint

    @property
    def confidence_head(self) -> bool:
        """Whether the logits' last unit is a confidence head's logit (from the store entry's manifest)."""
        return self._confidence_head if self.stored is None else self.stored.confidence_head


# ---------------------------------------------------------------------------- checks


def _check_model(model: Any) -> Callable[[Any], Any]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "The 'model' parameter must be a torch.nn.Module with a callable logits(x) method. "
            f"Got {type(model).__name__} instead."
        )
    logits = getattr(model, "logits", None)
    if not callable(logits):
        got = "no 'logits' attribute" if logits is None else f"a non-callable 'logits' ({type(logits).__name__})"
        raise TypeError(
            "The 'model' parameter must have a callable logits(x) method returning the logits "
            f"(wrap the network in a module whose logits(x) calls it). Got {type(model).__name__} "
            f"with {got} instead."
        )
    return logits


def _check_key(value: Any, name: str) -> str | int | None:
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    raise TypeError(f"The '{name}' parameter must be a str, an int or None. Got {type(value).__name__} instead.")


def _check_loader(loader: Any, needs_second_pass: bool) -> None:
    if isinstance(loader, (torch.Tensor, np.ndarray, str, bytes, Mapping)) or not isinstance(loader, Iterable):
        raise TypeError(
            "The 'loader' parameter must be an iterable of batches such as a torch DataLoader. "
            f"Got {type(loader).__name__} instead."
        )
    # An Iterator (generator, map, ...) is one-shot; checking never starts an iteration, which
    # for a DataLoader with workers would spawn processes.
    if needs_second_pass and isinstance(loader, Iterator):
        raise TypeError(
            "The 'loader' parameter must be re-iterable (e.g. a DataLoader) when caching without "
            "'data_fingerprint': the store reads it once to fingerprint the data. Got a one-shot "
            f"{type(loader).__name__} instead; pass data_fingerprint=... or a DataLoader."
        )


def _total_rows(loader: Any) -> int | None:
    """Rows the loader will yield, when a DataLoader says so: sizes the result, shows progress."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None
    sampler, batch_size, drop_last = loader.sampler, loader.batch_size, loader.drop_last
    if batch_size is None and isinstance(sampler, torch.utils.data.BatchSampler):
        # Batch-indexed data sets: DataLoader(ds, sampler=BatchSampler(...), batch_size=None).
        sampler, batch_size, drop_last = sampler.sampler, sampler.batch_size, sampler.drop_last
    if batch_size is None:
        return None
    try:
        rows = len(sampler)
    except (TypeError, NotImplementedError):
        return None
    return rows - rows % batch_size if drop_last else rows


# ---------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class _Keys:
    input: str | int | None
    label: str | int | None
    id: str | int | None


def _pick(batch: Mapping[Any, Any], key: Any, defaults: Sequence[str], what: str, name: str, index: int) -> Any:
    if key is not None:
        if key not in batch:
            raise ValueError(
                f"The '{name}' parameter names {key!r}, which batch {index} lacks. "
                f"Got a batch with keys {sorted(map(str, batch))} instead."
            )
        return batch[key]
    found = [k for k in defaults if k in batch]
    if len(found) > 1:
        raise ValueError(
            f"Batch {index} has several candidate {what} keys {found}; pass '{name}' to choose one."
        )
    if found:
        return batch[found[0]]
    if what == "input":
        raise ValueError(
            f"Batch {index} has no input under the default keys {list(defaults)}. Pass 'input_key'. "
            f"Got a batch with keys {sorted(map(str, batch))} instead."
        )
    return None


def _split_batch(batch: Any, keys: _Keys, index: int) -> tuple[Any, Any, Any]:
    """(input, labels or None, ids or None) of one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        return (
            _pick(batch, keys.input, DEFAULT_INPUT_KEYS, "input", "input_key", index),
            _pick(batch, keys.label, DEFAULT_LABEL_KEYS, "label", "label_key", index),
            _pick(batch, keys.id, DEFAULT_ID_KEYS, "id", "id_key", index),
        )
    if isinstance(batch, (tuple, list)):
        if any(isinstance(k, str) for k in (keys.input, keys.label, keys.id)):
            raise ValueError(
                f"Batch {index} is a {type(batch).__name__}; 'input_key', 'label_key' and 'id_key' "
                "must be int positions (or None) for such batches. Got a str key instead."
            )
        if (keys.input, keys.label, keys.id) != (None, None, None):
            return (
                _position(batch, 0 if keys.input is None else keys.input, "input_key", index),
                _position(batch, keys.label, "label_key", index),
                _position(batch, keys.id, "id_key", index),
            )
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                f"A {type(batch).__name__} batch must be (x,), (x, y) or (x, y, ids), or pass "
                f"'input_key'. Got {len(batch)} items in batch {index} instead."
            )
        return (*batch, *([None] * (3 - len(batch))))  # type: ignore[return-value]
    raise TypeError(
        "The 'loader' parameter must yield tensors, (x, y[, ids]) tuples/lists or dicts. "
        f"Got a {type(batch).__name__} in batch {index} instead."
    )


def _position(batch: Sequence[Any], key: int | None, name: str, index: int) -> Any:
    if key is None:
        return None
    if not -len(batch) <= key < len(batch):
        raise ValueError(
            f"The '{name}' parameter is position {key}, outside batch {index}'s {len(batch)} items. "
            f"Got a {type(batch).__name__} of {len(batch)} items instead."
        )
    return batch[key]


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _rows(x: Any, index: int) -> int:
    tensor = _first_tensor(x)
    if tensor is None or tensor.ndim == 0:
        got = "a 0-d tensor" if tensor is not None else type(x).__name__
        raise TypeError(
            "The model input of every batch must be a tensor with a batch axis, or a dict/list/tuple "
            f"of such tensors. Got {got} in batch {index} instead."
        )
    return int(tensor.shape[0])


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=x.is_pinned()) if x.device != device else x
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(_to_device(v, device) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _labels(y: Any, n: int, index: int) -> torch.Tensor | None:
    if y is None:
        return None
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(np.asarray(y))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"Labels must be a tensor or an array of numbers. Got {type(y).__name__} in batch {index} instead."
            ) from exc
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(
            f"The labels of each batch must have one row per input. Got {tuple(y.shape)} labels for "
            f"{n} inputs in batch {index} of 'loader' instead."
        )
    y = y.detach().to("cpu")
    if y.dtype == torch.bfloat16:  # NumPy and Arrow have no bfloat16
        y = y.to(torch.float32)
    return y


def _ids(ids: Any, n: int, start: int, index: int) -> np.ndarray:
    """A batch's sample ids, normalised by the one owner (:func:`seapig_core._validation.check_sample_ids`)."""
    try:
        return check_sample_ids(ids, n, name="ids", start=start)
    except ValueError as exc:
        shape = tuple(ids.shape) if hasattr(ids, "shape") else np.shape(np.asarray(ids, dtype=object))
        raise ValueError(
            f"The ids of each batch must be one per input. Got ids of shape {shape} for {n} inputs "
            f"in batch {index} of 'loader' instead ({exc})"
        ) from None
    except TypeError as exc:
        dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids, dtype=object).dtype
        raise TypeError(f"Sample ids must be integers or strings. Got dtype {str(dtype).removeprefix('torch.')} in batch {index} instead ({exc})") from None


def _batch_kind(labels: torch.Tensor | None, has_ids: bool, sample_ids: np.ndarray) -> tuple[Any, ...]:
    """What must stay the same from batch to batch, in a readable form."""
    label = None if labels is None else f"{labels.dtype} {tuple(labels.shape[1:])}"
    ids = None if not has_ids else "str" if sample_ids.dtype == object else "int"
    return ("labels", label, "ids", ids)


def _with_confidence(out: Any, n: int, index: int) -> tuple[Any, bool]:
    """``(logits, has confidence)``: a ``(logits, confidence_logit)`` pair joined along axis 1."""
    if not isinstance(out, (tuple, list)):
        return out, False
    if len(out) != 2 or not all(isinstance(part, torch.Tensor) for part in out):
        got = f"a {type(out).__name__} of {len(out)} item(s): {[type(part).__name__ for part in out]}"
        raise TypeError(
            "The 'model' parameter's logits(x) must return a torch.Tensor, or a (logits, confidence_logit) "
            f"pair of tensors for a model with a confidence head. Got {got} in batch {index} instead."
        )
    logits, confidence = out
    if logits.ndim == 1:
        logits = logits.unsqueeze(1)
    if logits.ndim == 0 or logits.shape[0] != n:
        raise ValueError(
            f"The 'model' parameter's logits(x) must return one row per input. Got logits of shape "
            f"{tuple(logits.shape)} for {n} inputs in batch {index} instead."
        )
    unit_free = (n, *logits.shape[2:])
    if tuple(confidence.shape) == (n, 1, *logits.shape[2:]):
        confidence = confidence.squeeze(1)
    if tuple(confidence.shape) != unit_free:
        raise ValueError(
            f"The confidence logit returned by the 'model' parameter's logits(x) must be shaped like the logits "
            f"without their unit axis (axis 1): {unit_free} or {(n, 1, *logits.shape[2:])} beside logits of shape "
            f"{tuple(logits.shape)}. Got shape {tuple(confidence.shape)} in batch {index} instead."
        )
    if confidence.dtype == torch.bool or confidence.is_complex():
        raise TypeError(f"The confidence logit must hold real numbers. Got dtype {confidence.dtype} in batch {index} instead.")
    device = logits.device
    joined = torch.cat((logits.detach().float(), confidence.detach().to(device, torch.float32).unsqueeze(1)), dim=1)
    return joined, True


def _logits(out: Any, n: int, trailing: tuple[int, ...] | None, index: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"The 'model' parameter's logits(x) must return a torch.Tensor (or a (logits, confidence_logit) "
            f"pair for a model with a confidence head). Got {type(out).__name__} in batch {index} instead."
        )
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(
            f"The 'model' parameter's logits(x) must return one row per input. Got shape {tuple(out.shape)} "
            f"for {n} inputs in batch {index} instead."
        )
    if trailing is not None and tuple(out.shape[1:]) != trailing:
        raise ValueError(
            f"The 'model' parameter's logits(x) must keep its trailing shape across batches. Got "
            f"{tuple(out.shape[1:])} in batch {index} instead of {trailing}."
        )
    if math.prod(out.shape[1:]) == 0:
        raise ValueError(
            f"The 'model' parameter's logits(x) must return at least one logit per input. Got shape "
            f"{tuple(out.shape)} in batch {index} instead."
        )
    if out.dtype == torch.bool or out.is_complex():
        raise TypeError(f"The 'model' parameter's logits(x) must return real numbers. Got dtype {out.dtype} instead.")
    return out.detach().to("cpu", torch.float32)


# ---------------------------------------------------------------------------- sinks


class _Rows:
    """Row blocks gathered into one tensor, each block copied once.

    With a known row count the blocks go into one preallocated tensor, which is returned as
    is (peak memory 1x). Otherwise they go into slabs that grow geometrically up to 64 MiB and
    are concatenated at the end (peak 2x, as in a loop that concatenates once); slabs that
    large are returned to the OS when freed, where many small copies would fragment the heap.
    Copying is not optional: a model or loader may reuse one output buffer for every batch.
    """

    _SLAB_BYTES = 64 << 20

    def __init__(self, capacity: int | None) -> None:
        self._capacity = capacity
        self._slabs: list[torch.Tensor] = []
        self._filled: list[int] = []

    def append(self, block: torch.Tensor) -> None:
        n = int(block.shape[0])
        if not self._slabs or self._filled[-1] + n > self._slabs[-1].shape[0]:
            if self._capacity is not None and not self._slabs:
                rows = max(self._capacity, n)
            else:
                row_bytes = max(1, math.prod(block.shape[1:]) * block.element_size())
                rows = max(n, min(sum(self._filled), self._SLAB_BYTES // row_bytes))
            # Allocated outside inference mode: the result must be an ordinary tensor that
            # autograd and in-place updates accept later.
            with torch.inference_mode(False):
                self._slabs.append(torch.empty((rows, *block.shape[1:]), dtype=block.dtype))
            self._filled.append(0)
        start = self._filled[-1]
        self._slabs[-1][start : start + n] = block
        self._filled[-1] = start + n

    def result(self) -> torch.Tensor:
        if len(self._slabs) == 1 and self._filled[0] == self._slabs[0].shape[0]:
            return self._slabs[0]
        parts = [slab[:filled] for slab, filled in zip(self._slabs, self._filled, strict=True)]
        self._slabs, self._filled = [], []
        return torch.cat(parts)


class _MemorySink:
    def __init__(self, capacity: int | None) -> None:
        self._logits = _Rows(capacity)
        self._labels = _Rows(capacity)
        self._ids: list[np.ndarray] = []
        self._has_labels = False

    def append(self, logits: torch.Tensor, labels: torch.Tensor | None, ids: np.ndarray) -> None:
        self._logits.append(logits)
        if labels is not None:
            self._labels.append(labels)
            self._has_labels = True
        self._ids.append(ids)

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        labels = self._labels.result() if self._has_labels else None
        return self._logits.result(), labels, np.concatenate(self._ids)


# ---------------------------------------------------------------------------- the loop


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    return tqdm(
        total=total, desc=desc, unit="sample", unit_scale=True, disable=not enabled, file=sys.stderr, leave=False
    )


def _run(
    model: torch.nn.Module,
    logits_fn: Callable[[Any], Any],
    loader: Iterable[Any],
    keys: _Keys,
    sink: Any,
    hasher: store.DataFingerprint | None,
    progress: bool,
    callback: ProgressCallback | None,
) -> tuple[int, bool]:
    """Extract every batch into ``sink``; returns the number of rows and whether the model
    returned a confidence logit."""
    device = _model_device(model)
    total = _total_rows(loader)
    flags = [(module, module.training) for module in model.modules()]
    done = 0
    batches = 0
    trailing: tuple[int, ...] | None = None
    first_kind: tuple[Any, ...] | None = None
    confidence_head: bool | None = None
    model.eval()
    try:
        with torch.inference_mode(), _progress_bar(progress, total, "extracting logits") as bar:
            for index, batch in enumerate(loader):
                x, y, ids = _split_batch(batch, keys, index)
                n = _rows(x, index)
                labels = _labels(y, n, index)
                sample_ids = _ids(ids, n, done, index)
                kind = _batch_kind(labels, ids is not None, sample_ids)
                if first_kind is None:
                    first_kind = kind
                elif kind != first_kind:
                    raise ValueError(
                        "Every batch of 'loader' must carry labels and ids like the first batch (labels' "
                        f"presence, dtype and trailing shape; ids' presence and kind): {first_kind}. Got "
                        f"{kind} in batch {index} instead."
                    )
                if hasher is not None:
                    hasher.update(x, labels, sample_ids if ids is not None else None)
                out, has_confidence = _with_confidence(logits_fn(_to_device(x, device)), n, index)
                if confidence_head is not None and has_confidence != confidence_head:
                    raise ValueError(
                        "The 'model' parameter's logits(x) must return a (logits, confidence_logit) pair in every "
                        f"batch or in none. Got {'a pair' if has_confidence else 'a tensor'} in batch {index} after "
                        f"{'a tensor' if has_confidence else 'pairs'} before."
                    )
                confidence_head = has_confidence
                out = _logits(out, n, trailing, index)
                trailing = tuple(out.shape[1:])
                sink.append(out, labels, sample_ids)
                done += n
                batches += 1
                bar.update(n)
                if callback is not None:
                    callback(done, total)
    finally:
        model.train(flags[0][1])
        for module, flag in flags:
            module.training = flag
    if batches == 0:
        raise ValueError("The 'loader' parameter must yield at least one batch. Got an empty loader instead.")
    if done == 0:
        raise ValueError(f"The 'loader' parameter must yield at least one sample. Got {batches} empty batches instead.")
    return done, bool(confidence_head)


def _hash_loader(loader: Iterable[Any], keys: _Keys, progress: bool) -> str:
    """The content fingerprint of ``loader`` (a pass without the model)."""
    hasher = store.DataFingerprint()
    done = 0
    with torch.inference_mode(), _progress_bar(progress, _total_rows(loader), "fingerprinting data") as bar:
        for index, batch in enumerate(loader):
            x, y, ids = _split_batch(batch, keys, index)
            n = _rows(x, index)
            labels = _labels(y, n, index)
            sample_ids = None if ids is None else _ids(ids, n, done, index)
            hasher.update(x, labels, sample_ids)
            done += n
            bar.update(n)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------- public


def extract_logits(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    outdir: str | os.PathLike[str] | None = None,
    prefix: str | None = None,
    input_key: str | int | None = None,
    label_key: str | int | None = None,
    id_key: str | int | None = None,
    progress: bool | None = None,
    progress_callback: ProgressCallback | None = None,
    refresh: bool = False,
    data_fingerprint: str | None = None,
) -> Extraction:
    """Run ``model.logits`` over ``loader``; return logits, labels and sample ids in order.

    Parameters
    ----------
    model : torch.nn.Module
        Has a callable ``logits(x)`` returning a tensor with the batch on its first axis, or a
        ``(logits, confidence_logit)`` pair for a model with a learned confidence head (stored
        as ``(N, C + 1)``; see the module docstring).
    loader : iterable of batches
        Usually a ``torch.utils.data.DataLoader``; batch forms in the module docstring. Must be
        deterministic for caching to hit (see :mod:`seapig_core.store`).
    outdir : str or os.PathLike, optional
        Directory of the logits store. Without it, nothing is written or read.
    prefix : str, optional
        File-name stem of the store entry (``{prefix}.logits.arrow``); no path separators or
        ``..``. Default entry name ``logits``. Requires ``outdir``.
    input_key, label_key, id_key : str or int, optional
        Where batches keep the input, labels and ids (dict keys, or positions in tuples).
    progress : bool, optional
        Show a tqdm progress bar on stderr. Default: only when stderr is a terminal.
    progress_callback : callable, optional
        Called as ``progress_callback(done_rows, total_rows_or_None)`` after each batch the
        model runs on (not while fingerprinting the data for a cache lookup).
    refresh : bool, default False
        Recompute and overwrite the store entry even if it matches. Requires ``outdir``.
    data_fingerprint : str, optional
        A name for the data (e.g. a data set version or file hash) used in the store's
        fingerprint instead of hashing what the loader yields; the loader is then not read on a
        cache hit. Requires ``outdir``.

    Returns
    -------
    Extraction

    Raises
    ------
    TypeError
        A model that is not a module or has no callable ``logits``; a loader that is not an
        iterable of batches (or, caching without ``data_fingerprint``, not re-iterable); an
        unsupported batch, label or id type; a model returning something other than a tensor
        or a pair of tensors.
    ValueError
        An empty loader; labels or ids whose length differs from the inputs'; logits whose row
        count differs from the inputs' or whose trailing shape changes between batches; a
        confidence logit not shaped like the logits without their unit axis, or returned in
        some batches only; an
        ``outdir`` that cannot be written; a ``prefix`` with a path separator or ``..``;
        ``prefix``/``refresh``/``data_fingerprint`` without ``outdir``.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class Net(torch.nn.Linear):
    ...     def logits(self, x):
    ...         return self(x)
    >>> loader = DataLoader(TensorDataset(torch.randn(10, 4), torch.arange(10) % 3), batch_size=4)
    >>> out = extract_logits(Net(4, 3), loader, progress=False)
    >>> tuple(out.logits.shape), out.labels[:4].tolist(), out.sample_ids[:3].tolist()
    ((10, 3), [0, 1, 2, 0], [0, 1, 2])
    """
    logits_fn = _check_model(model)
    keys = _Keys(_check_key(input_key, "input_key"), _check_key(label_key, "label_key"), _check_key(id_key, "id_key"))
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    elif not isinstance(progress, bool):
        raise TypeError(f"The 'progress' parameter must be a bool or None. Got {type(progress).__name__} instead.")
    if progress_callback is not None and not callable(progress_callback):
        raise TypeError(
            f"The 'progress_callback' parameter must be callable. Got {type(progress_callback).__name__} instead."
        )
    if not isinstance(refresh, bool):
        raise TypeError(f"The 'refresh' parameter must be a bool. Got {type(refresh).__name__} instead.")
    if data_fingerprint is not None and (not isinstance(data_fingerprint, str) or not data_fingerprint):
        raise TypeError(
            f"The 'data_fingerprint' parameter must be a non-empty str. Got {data_fingerprint!r} instead."
        )

    if outdir is None:
        options = (("prefix", prefix), ("refresh", refresh), ("data_fingerprint", data_fingerprint))
        given = [name for name, value in options if value]
        if given:
            raise ValueError(
                f"The {', '.join(repr(g) for g in given)} parameter(s) only apply with 'outdir' (the logits "
                "store). Got them without 'outdir' instead."
            )
        _check_loader(loader, needs_second_pass=False)
        sink = _MemorySink(_total_rows(loader))
        _, confidence_head = _run(model, logits_fn, loader, keys, sink, None, progress, progress_callback)
        return Extraction(sink.result(), confidence_head=confidence_head)

    if prefix is not None:
        check_file_stem(prefix, "prefix")
    directory = ensure_writable_dir(outdir, "outdir")
    # Only a lookup fingerprints the data in a pass of its own.
    _check_loader(loader, needs_second_pass=data_fingerprint is None and not refresh)
    data_path, _ = store.entry_paths(directory, prefix)
    components: dict[str, Any] = {
        "model": store.model_fingerprint(model),
        "settings": {"input_key": keys.input, "label_key": keys.label, "id_key": keys.id, "dtype": "float32"},
        "library_version": __version__,
        "schema_version": store.SCHEMA_VERSION,
        "data": None if data_fingerprint is None else {"kind": "given", "value": data_fingerprint},
    }

    if not refresh:
        # The store's policy; the data is fingerprinted (a pass over the loader) only when the
        # rest of the fingerprint already matches the entry's.
        def content() -> dict[str, str]:
            return {"kind": "content", "value": _hash_loader(loader, keys, progress)}

        wanted = {**components, "data": components["data"] or content}
        stored = store.lookup(directory, prefix, wanted)
        if stored is not None:
            return Extraction(stored=stored, from_cache=True)

    # Key the entry by the data the model actually saw: even after a lookup pass, hash again,
    # since a loader need not yield the same data twice (e.g. a seeded shuffle that advances).
    hasher = store.DataFingerprint() if data_fingerprint is None else None
    with store.LogitsWriter(data_path) as writer:
        _, confidence_head = _run(model, logits_fn, loader, keys, writer, hasher, progress, progress_callback)
        if hasher is not None:
            components["data"] = {"kind": "content", "value": hasher.hexdigest()}
        key = store.fingerprint_key(components)
        layout = {"confidence_head": True} if confidence_head else {}
        stored = writer.commit({**components, "key": key}, layout=layout)
    return Extraction(stored=stored)
