"""The fingerprinted on-disk logits store: one Arrow IPC file per entry, plus a JSON manifest.

Files
-----
An entry is named by ``outdir`` and ``prefix``; :func:`entry_paths` and :func:`is_entry` are the
only places that know the names:

- ``{prefix}.logits.arrow`` (``logits.arrow`` without a prefix): a plain Arrow IPC *file*
  written by ``pyarrow.ipc.new_file``, one record batch per chunk of :data:`BATCH_ROWS` rows
  (fewer for very wide logits), readable by ``pyarrow.ipc.open_file`` and
  ``pandas.read_feather``. Columns:

  - ``logits``: ``FixedSizeList<float32>[W]``, each sample's logits flattened row-major
    (``W`` is the product of the model's trailing output shape);
  - ``sample_id``: ``int64`` (the running index, or the batch's integer ids) or
    ``large_string`` (string ids);
  - ``label`` (when the batches carry labels): a primitive column (``bool``, integers or
    floats), or ``FixedSizeList<dtype>[L]`` for per-sample label vectors (multilabel targets).

  The schema metadata key ``seapig_core`` holds JSON describing the layout: ``format``
  (``"seapig_core.logits"``), ``schema_version``, ``library_version``, ``trailing_shape`` (the
  logits' shape after the sample axis), ``n_classes`` (its first axis; 1 for a single logit),
  ``label`` (dtype and shape, or null) and ``sample_id`` (dtype). The row count and the
  fingerprint, known only once every batch is written, are in the manifest.
- ``{prefix}.logits.json``: the manifest, written *after* the data file: format, schema
  version, the data file's name and size, ``n_samples``, ``logits_shape`` (``[N,
  *trailing]``), the fingerprint, ``layout`` (``{"confidence_head": true}`` when the model
  returned a learned confidence head's logit, stored as the last unit of axis 1, see
  :mod:`seapig_core.layout`; ``{}`` otherwise, and absent in entries of earlier versions), and
  the file cut into *segments* that tile it, each with its offset, length, row count and
  ``xxh3_128`` checksum: segment ``i`` holds record batch ``i`` (the first also the file's
  magic and schema), the last one the footer.

Writing streams: model batches are gathered into chunks of :data:`BATCH_ROWS` rows and each
chunk goes to pyarrow's writer through a sink that checksums the bytes as they are written, so
memory stays bounded by one chunk whatever the data set's size. The file is written under an
owned temporary name and renamed into place (:func:`seapig_core._io.atomic_path`, which also
removes the temporaries of dead writers in the directory first); the previous manifest is
removed before that rename and the new one written after it. A run killed at any point leaves
either no entry, the previous entry, or a data file without a manifest, which is never served.

Reading (:func:`load_logits`, :func:`lookup`) maps the file (copy-on-write) and checks, in
milliseconds whatever the entry's size: the manifest, the file's size, the footer's checksum,
the schema and the row counts. Each chunk's checksum is verified when the chunk is first read
(:meth:`StoredLogits.iter_chunks`, or the ``logits``/``labels``/``sample_ids`` properties that
materialise the whole entry), so a hit that reads the data verifies it in the same pass and
never costs a separate re-hash. A chunk that fails raises :class:`CorruptEntryError` naming the
file and the rows, and removes the entry's manifest (if unchanged since it was read), so that the
next extraction recomputes the entry.

Trust
-----
An entry is served by :func:`lookup` only when its manifest parses (bounded JSON, a JSON
object), has this format and schema version, records the requested fingerprint, and the data
file opens with the recorded size, footer checksum, schema and row counts; otherwise it is
recomputed with a :class:`CorruptEntryWarning` naming the file (an entry of an older schema
version, or with another fingerprint, is recomputed silently, logged at INFO). Reading never
unpickles and never executes anything from the files: the bytes are parsed as Arrow and JSON
only. The checksums (xxh3_128, non-cryptographic, ~10 GB/s) detect corruption, truncation and
accidental replacement. They are not a signature, and neither was the SHA-256 of earlier
versions: whoever can write ``outdir`` can write a matching manifest too. Protect the directory
as you would the model.

Fingerprint
-----------
The key is the SHA-256 of the canonical JSON of five components:

- ``model`` (:func:`model_fingerprint`): the model's class (module and qualified name), a
  SHA-256 over every parameter and buffer (names, dtypes, shapes and bytes; non-persistent
  buffers included) and a SHA-256 of ``repr(model)`` (the module tree and its
  hyperparameters). It cannot see the *code* of ``forward``/``logits``: after changing the
  code but not the weights, pass ``refresh=True`` (or use a new ``prefix``).
- ``data``: by default a content hash (:class:`DataFingerprint`) of exactly what the loader
  yields, in order: for every batch its row count and the bytes, dtype, shape and structure
  (dict keys, sequence positions) of the model input, the labels and the ids. It sees any
  change in values, order, batching, dtype or shape. It cannot see what the loader does not
  yield (other dict entries, preprocessing inside the model). Random augmentation or shuffling
  yields different bytes on every pass, so such a loader never hits the store (correct, but
  caching is then useless: calibrate on a deterministic loader). Computing it reads the loader
  once without the model, so a hit still costs one pass of data loading. Pass
  ``data_fingerprint="..."`` (e.g. a data set version or a file hash) to skip that pass: the
  store then trusts your string and sees nothing of the data.
- ``settings``: the extraction settings (batch keys, output dtype).
- ``library_version`` and ``schema_version``: a new seapig_core version recomputes.

The compute device is not part of the fingerprint: logits computed on a GPU are served to a
CPU run of the same model and data. To force a recomputation, pass ``refresh=True`` to
:func:`seapig_core.extract.extract_logits` (or ``fit``); the entry is then overwritten.

Caveats
-------
The materialised ``logits``/``labels``/``sample_ids`` are ordinary in-memory copies (1x the
entry's size). Chunks from :meth:`StoredLogits.iter_chunks` are zero-copy views of the entry's
private mapping where they fall inside one record batch: writing into them never reaches the
file, but later reads of the same :class:`StoredLogits` see the change; treat them as
read-only. Entries are replaced by renaming, so a refresh never changes an entry already opened
(POSIX keeps the old file alive while it is mapped), but truncating or rewriting the file *in
place* while it is mapped is outside the trust model: touching a truncated page fails
(``SIGBUS``), and a chunk already verified is not verified again. On Windows a mapped file
cannot be replaced. Two processes writing the same entry at once each write a complete file; the
last rename wins, and a data file paired with the other writer's manifest fails verification
and is recomputed.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import torch
import xxhash

from seapig_core._io import (
    atomic_path,
    atomic_write_json,
    check_file_stem,
    header_problem,
    loads_json,
    read_json_object,
)
from seapig_core._version import __version__

__all__ = [
    "BATCH_ROWS",
    "CHECKSUM",
    "FORMAT",
    "MANIFEST_FORMAT",
    "SCHEMA_VERSION",
    "CorruptEntryError",
    "CorruptEntryWarning",
    "DataFingerprint",
    "LogitsChunk",
    "LogitsWriter",
    "StoredLogits",
    "entry_paths",
    "entry_prefix",
    "fingerprint_key",
    "is_entry",
    "load_logits",
    "lookup",
    "model_fingerprint",
]

FORMAT = "seapig_core.logits"
MANIFEST_FORMAT = "seapig_core.logits.manifest"
#: 2: pyarrow's own multi-batch IPC writer, segment checksums in the manifest (1: one record
#: batch, whole-file SHA-256).
SCHEMA_VERSION = 2
#: The checksum of every segment; the manifest names it, so that it can change with the schema.
CHECKSUM = "xxh3_128"
#: Rows per record batch (chunk) written; fewer when a chunk's logits would exceed 32 MiB.
BATCH_ROWS = 65536
_BATCH_BYTES = 32 << 20
_META_KEY = b"seapig_core"
_DEFAULT_STEM = "logits"
_DATA_SUFFIX = ".arrow"
_MANIFEST_SUFFIX = ".json"
_ENTRY_SUFFIX = f".{_DEFAULT_STEM}{_DATA_SUFFIX}"

logger = logging.getLogger(__name__)


class CorruptEntryWarning(UserWarning):
    """A store entry was unreadable, truncated or tampered with, and is recomputed."""


class CorruptEntryError(ValueError):
    """A store file is missing, unreadable, not a store file, or fails verification."""


class _OtherSchema(CorruptEntryError):
    """Internal: a manifest of this format but another schema version (a plain miss)."""


# ---------------------------------------------------------------------------- naming


def entry_paths(outdir: str | os.PathLike[str], prefix: str | None = None) -> tuple[Path, Path]:
    """The data file and manifest of the entry ``prefix`` in ``outdir``.

    ``prefix=None`` names the entry ``logits``; otherwise ``{prefix}.logits``. The prefix must
    be a plain file-name stem (no path separator, no ``..``), so the entry is inside ``outdir``.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        ``{stem}.arrow`` and ``{stem}.json``.

    Examples
    --------
    >>> [p.name for p in entry_paths("store", "calibration")]
    ['calibration.logits.arrow', 'calibration.logits.json']
    """
    stem = _DEFAULT_STEM if prefix is None else f"{check_file_stem(prefix, 'prefix')}.{_DEFAULT_STEM}"
    directory = Path(outdir)
    return directory / f"{stem}{_DATA_SUFFIX}", directory / f"{stem}{_MANIFEST_SUFFIX}"


def _prefix_of(name: str) -> tuple[bool, str | None]:
    if name == f"{_DEFAULT_STEM}{_DATA_SUFFIX}":
        return True, None
    if not name.endswith(_ENTRY_SUFFIX):
        return False, None
    prefix = name[: -len(_ENTRY_SUFFIX)]
    try:
        check_file_stem(prefix)
    except ValueError:
        return False, None
    return True, prefix


def is_entry(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as a store entry's data file (``*.logits.arrow``).

    Only the name is looked at: a data file without its manifest is still an entry (one that
    :func:`load_logits` refuses to read unverified). Temporary files are not entries.

    Examples
    --------
    >>> is_entry("store/batch-007.logits.arrow"), is_entry("inbox/batch-007.arrow")
    (True, False)
    """
    return _prefix_of(Path(path).name)[0]


def entry_prefix(path: str | os.PathLike[str]) -> str | None:
    """The prefix of the entry whose data file is ``path``: ``entry_paths(path.parent, prefix)``.

    Returns None for the default entry ``logits.arrow``.

    Raises
    ------
    ValueError
        If ``path`` is not named as an entry (see :func:`is_entry`).

    Examples
    --------
    >>> entry_prefix("store/batch-007.logits.arrow")
    'batch-007'
    """
    ok, prefix = _prefix_of(Path(path).name)
    if not ok:
        raise ValueError(
            f"The 'path' parameter must name a logits store entry (*{_ENTRY_SUFFIX}). Got {str(path)!r} instead."
        )
    return prefix


# ---------------------------------------------------------------------------- fingerprints


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (any dtype, bfloat16 included) as a contiguous CPU buffer."""
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """``array``'s bytes as a flat uint8 view (no copy when contiguous; empty arrays too)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Fingerprint a model's class, parameters, buffers and module tree.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    dict
        ``class`` (``module.QualName``), ``state`` (SHA-256 over every parameter and buffer:
        name, dtype, shape, bytes) and ``architecture`` (SHA-256 of ``repr(model)``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__} instead.")
    digest = hashlib.sha256(b"seapig_core.model.v1")
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in items:
            if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
                raise ValueError(
                    "The 'model' parameter must have initialised weights to be fingerprinted for the logits "
                    f"store. Got the lazy, uninitialised {name!r} instead; run one forward pass first."
                )
            header = f"{kind}|{name}|{tensor.dtype}|{tuple(tensor.shape)}|"
            digest.update(header.encode())
            digest.update(_tensor_bytes(tensor))
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "state": digest.hexdigest(),
        "architecture": hashlib.sha256(repr(model).encode()).hexdigest(),
    }


class DataFingerprint:
    """Streaming SHA-256 over what a loader yields (see the module docstring).

    Examples
    --------
    >>> import torch
    >>> a, b = DataFingerprint(), DataFingerprint()
    >>> a.update(torch.zeros(2, 3), None, None)
    >>> b.update(torch.zeros(2, 3), None, None)
    >>> a.hexdigest() == b.hexdigest()
    True
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"seapig_core.data.v1")

    def update(self, inputs: Any, labels: Any, ids: Any) -> None:
        """Add one batch: its model input, labels (or None) and ids (or None)."""
        self._digest.update(b"\x00batch")
        for part in (inputs, labels, ids):
            self._add(part)

    def hexdigest(self) -> str:
        """The fingerprint so far, as 64 hex characters."""
        return self._digest.hexdigest()

    def _tag(self, text: str) -> None:
        self._digest.update(f"\x00{text}".encode())

    def _add(self, value: Any) -> None:
        if value is None:
            self._tag("none")
        elif isinstance(value, torch.Tensor):
            self._tag(f"tensor|{value.dtype}|{tuple(value.shape)}")
            self._digest.update(_tensor_bytes(value))
        elif isinstance(value, np.ndarray):
            if value.dtype.kind in "OUS":
                self._add(value.tolist())
            else:
                self._tag(f"array|{value.dtype.str}|{value.shape}")
                self._digest.update(_raw_bytes(value))
        elif isinstance(value, Mapping):
            self._tag(f"map|{len(value)}")
            for key, item in value.items():
                self._add(key)
                self._add(item)
        elif isinstance(value, (list, tuple)):
            self._tag(f"seq|{len(value)}")
            for item in value:
                self._add(item)
        elif isinstance(value, str):
            encoded = value.encode("utf-8", "surrogatepass")
            self._tag(f"str|{len(encoded)}")
            self._digest.update(encoded)
        elif isinstance(value, (bool, int, float, np.generic)):
            self._tag(f"scalar|{type(value).__name__}|{value!r}")
        else:
            raise TypeError(
                f"The data fingerprint cannot hash a {type(value).__name__} found in a batch. "
                "Pass 'data_fingerprint' (a string naming the data) to skip hashing the data."
            )


def fingerprint_key(components: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of fingerprint ``components`` (``key`` itself excluded)."""
    payload = {k: v for k, v in components.items() if k != "key"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- layout


def _checksum(data: Any) -> str:
    return xxhash.xxh3_128_hexdigest(data)


_LABEL_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64,
)


def _label_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype that stores labels of torch ``dtype``: bool, integers or floats."""
    if dtype not in _LABEL_DTYPES:
        raise TypeError(f"Labels must be bool, integer or float16/32/64 to be stored. Got {dtype} instead.")
    return torch.empty(0, dtype=dtype).numpy().dtype


def _label_arrow_type(dtype_name: str) -> pa.DataType:
    return pa.bool_() if dtype_name == "bool" else pa.from_numpy_dtype(np.dtype(dtype_name))


def _schema(width: int, id_kind: str, label: Mapping[str, Any] | None, metadata: Mapping[str, Any]) -> pa.Schema:
    fields = [
        pa.field("logits", pa.list_(pa.float32(), width), nullable=False),
        pa.field("sample_id", pa.large_string() if id_kind == "string" else pa.int64(), nullable=False),
    ]
    if label is not None:
        kind = _label_arrow_type(label["dtype"])
        if label["shape"]:
            kind = pa.list_(kind, math.prod(label["shape"]))
        fields.append(pa.field("label", kind, nullable=False))
    text = json.dumps(metadata, sort_keys=True, allow_nan=False).encode()
    return pa.schema(fields, metadata={_META_KEY: text})


# ---------------------------------------------------------------------------- writing


class _ChecksummedSink:
    """A write-only file for pyarrow that checksums what passes through, segment by segment.

    pyarrow hands large buffers over without copying them; each is checksummed and written
    once. :meth:`end_segment` closes the current segment (its offset, length, rows, checksum).
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._hasher = xxhash.xxh3_128()
        self._position = 0
        self._start = 0
        self.segments: list[dict[str, Any]] = []

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hasher.update(view)
        self._handle.write(view)
        self._position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:  # the handle belongs to the LogitsWriter
        pass

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def end_segment(self, rows: int) -> None:
        self.segments.append(
            {"offset": self._start, "length": self._position - self._start, "rows": rows, "digest": self._hasher.hexdigest()}
        )
        self._hasher.reset()
        self._start = self._position


class LogitsWriter:
    """Stream batches into a store entry; atomic, memory bounded by one chunk.

    Use as a context manager: :meth:`append` each batch, then :meth:`commit` once. The data file
    appears under its final name, followed by the manifest, only when the block exits without
    an exception after :meth:`commit`; otherwise nothing is left behind.

    Parameters
    ----------
    path : str or os.PathLike
        The data file, ``entry_paths(outdir, prefix)[0]``; its directory must exist.
    batch_rows : int, optional
        Rows per record batch. Default :data:`BATCH_ROWS`, fewer when a batch's logits would
        exceed 32 MiB. Memory while writing is about one batch.

    Examples
    --------
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> data_path, _ = entry_paths(d, "demo")
    >>> with LogitsWriter(data_path) as writer:
    ...     writer.append(torch.zeros(3, 2), None, np.arange(3))
    ...     stored = writer.commit({"key": "0" * 64})
    >>> load_logits(data_path).logits_shape
    (3, 2)
    """

    def __init__(self, path: str | os.PathLike[str], *, batch_rows: int | None = None) -> None:
        if batch_rows is not None and (not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1):
            raise ValueError(f"The 'batch_rows' parameter must be a positive int or None. Got {batch_rows!r} instead.")
        self.path = Path(path)
        self._requested_rows = batch_rows
        self._stack: contextlib.ExitStack | None = None
        self._handle: BinaryIO | None = None
        self._sink: _ChecksummedSink | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows = 0
        self._shape: tuple[int, ...] | None = None
        self._label: dict[str, Any] | None = None
        self._id_kind: str | None = None
        self._schema: pa.Schema | None = None
        self._buffered = 0
        self._manifest: dict[str, Any] | None = None
        self._result: StoredLogits | None = None

    def __enter__(self) -> LogitsWriter:
        manifest_path = _manifest_path(self.path)
        for existing in (self.path, manifest_path):
            if existing.is_dir():
                raise ValueError(
                    f"The logits store entry {str(self.path)!r} cannot be written: {str(existing)!r} is a directory. "
                    "Remove it or choose another prefix."
                )
        stack = contextlib.ExitStack()
        try:
            self._tmp = stack.enter_context(atomic_path(self.path))
            self._handle = stack.enter_context(open(self._tmp, "wb"))
        except BaseException:
            stack.close()
            raise
        self._sink = _ChecksummedSink(self._handle)
        self._stack = stack
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        if exc_type is None and self._result is None:
            # Never rename an unfinished file into place: unwind as if the block had failed.
            error = RuntimeError("LogitsWriter exited without commit(); the entry was discarded.")
            stack.__exit__(RuntimeError, error, None)
            raise error
        if exc_type is not None:
            return bool(stack.__exit__(exc_type, exc, tb))
        # The old manifest goes first: a run killed from here on leaves a data file without a
        # manifest (never served), never a new data file beside the old entry's manifest.
        try:
            _manifest_path(self.path).unlink(missing_ok=True)
        except BaseException as error:
            stack.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
            raise
        stack.__exit__(None, None, None)  # fsync, rename into place
        _write_manifest(_manifest_path(self.path), self._manifest)
        return False

    # -- streaming

    def append(self, logits: torch.Tensor, labels: torch.Tensor | None, sample_ids: np.ndarray) -> None:
        """Write one batch: logits ``(B, *trailing)``, labels ``(B, ...)`` or None, ids ``(B,)``.

        The trailing shapes, label dtype and id kind must match the first batch's.
        """
        if self._sink is None or self._stack is None:
            raise RuntimeError("LogitsWriter.append() needs an open writer: use it as a context manager.")
        if self._result is not None:
            raise RuntimeError("LogitsWriter.append() called after commit().")
        rows = int(logits.shape[0])
        label = None
        if labels is not None:
            dtype = _label_numpy_dtype(labels.dtype)
            if 0 in labels.shape[1:]:
                raise ValueError(
                    f"Labels must have at least one value per sample to be stored. Got shape {tuple(labels.shape)} instead."
                )
            label = {"dtype": "bool" if dtype == np.bool_ else dtype.name, "shape": list(labels.shape[1:])}
        id_kind = "string" if sample_ids.dtype.kind in "OUS" else "int64"
        if self._shape is None:
            self._start(tuple(logits.shape[1:]), label, id_kind)
        elif (tuple(logits.shape[1:]), label, id_kind) != (self._shape, self._label, self._id_kind):
            raise ValueError(
                "Every batch written to the store must match the first batch's logits shape, label dtype/shape "
                f"and id kind {(self._shape, self._label, self._id_kind)}. "
                f"Got {(tuple(logits.shape[1:]), label, id_kind)} instead."
            )
        values = logits.detach().to("cpu", torch.float32).contiguous().numpy().reshape(rows, math.prod(self._shape))
        label_values = None if labels is None else labels.detach().to("cpu").contiguous().numpy()
        ids = sample_ids if id_kind == "string" else np.asarray(sample_ids, dtype=np.int64)
        if len(ids) != rows or (label_values is not None and len(label_values) != rows):
            raise ValueError(f"Logits, labels and ids of a batch must have one row per sample. Got {rows} logits rows.")
        position = 0
        while position < rows:
            if self._buffered == 0 and rows - position >= self._batch_rows:
                stop = position + self._batch_rows  # a whole chunk: straight from the caller's memory
                self._write(values[position:stop], _rows(label_values, position, stop), ids[position:stop])
                position = stop
                continue
            take = min(self._batch_rows - self._buffered, rows - position)
            start, stop = self._buffered, self._buffered + take
            self._logits_buffer[start:stop] = values[position : position + take]
            if label_values is not None:
                self._label_buffer[start:stop] = label_values[position : position + take]
            if id_kind == "string":
                self._id_buffer.extend(ids[position : position + take].tolist())
            else:
                self._id_buffer[start:stop] = ids[position : position + take]
            self._buffered = stop
            position += take
            if self._buffered == self._batch_rows:
                self._flush()

    def _start(self, shape: tuple[int, ...], label: dict[str, Any] | None, id_kind: str) -> None:
        width = math.prod(shape)
        if width == 0:
            raise ValueError(f"Logits must have at least one value per sample. Got trailing shape {shape} instead.")
        self._shape, self._label, self._id_kind = shape, label, id_kind
        rows = self._requested_rows
        if rows is None:
            fit = max(1, _BATCH_BYTES // (4 * width))
            rows = min(BATCH_ROWS, 1 << (fit.bit_length() - 1))
        self._batch_rows = rows
        metadata = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            "trailing_shape": list(shape),
            "n_classes": shape[0] if shape else 1,
            "label": label,
            "sample_id": {"dtype": id_kind},
        }
        self._schema = _schema(width, id_kind, label, metadata)
        self._logits_buffer = np.empty((rows, width), dtype=np.float32)
        if label is not None:
            self._label_buffer = np.empty((rows, *label["shape"]), dtype=np.bool_ if label["dtype"] == "bool" else label["dtype"])
        self._id_buffer: Any = [] if id_kind == "string" else np.empty(rows, dtype=np.int64)
        self._writer = pa.ipc.new_file(self._sink, self._schema)

    def _flush(self) -> None:
        n = self._buffered
        if n == 0:
            return
        labels = None if self._label is None else self._label_buffer[:n]
        ids = np.asarray(self._id_buffer, dtype=object) if self._id_kind == "string" else self._id_buffer[:n]
        self._write(self._logits_buffer[:n], labels, ids)
        self._buffered = 0
        if self._id_kind == "string":
            self._id_buffer = []

    def _write(self, values: np.ndarray, labels: np.ndarray | None, ids: np.ndarray) -> None:
        n = len(values)
        width = values.shape[1]
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), width)]
        if self._id_kind == "string":
            try:
                arrays.append(pa.array([str(v) for v in ids], type=pa.large_string()))
            except (UnicodeError, pa.ArrowException) as exc:
                raise ValueError(f"Sample ids must be valid Unicode text to be stored. Got {exc} instead.") from exc
        else:
            arrays.append(pa.array(ids, type=pa.int64()))
        if labels is not None:
            label = self._label
            flat = pa.array(np.ascontiguousarray(labels).reshape(-1), type=_label_arrow_type(label["dtype"]))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, math.prod(label["shape"])) if label["shape"] else flat)
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema))
        self._sink.end_segment(n)
        self._rows += n

    def commit(self, fingerprint: Mapping[str, Any], *, layout: Mapping[str, Any] | None = None) -> StoredLogits:
        """Finish the file; return the entry as it will be served.

        Parameters
        ----------
        fingerprint : Mapping
            The entry's fingerprint components with their ``key`` (see :func:`fingerprint_key`).
        layout : Mapping, optional
            JSON-able description of the logits' layout, kept in the manifest (not part of the
            fingerprint): ``{"confidence_head": True}`` for logits with a confidence unit.

        Returns
        -------
        StoredLogits
            The entry, verified as it is read like any other; its ``path`` is the final name,
            which it takes when the ``with`` block exits.

        Raises
        ------
        ValueError
            If no rows were appended.
        """
        if self._sink is None or self._handle is None or self._stack is None or self._result is not None:
            raise RuntimeError("LogitsWriter.commit() needs an open, uncommitted writer.")
        self._flush()
        if self._rows == 0 or self._writer is None or self._shape is None:
            raise ValueError("Cannot store an empty extraction: no rows were appended.")
        self._writer.close()
        self._sink.end_segment(0)  # the footer
        self._handle.close()
        self._manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            "data_file": self.path.name,
            "size": self._sink.tell(),
            "n_samples": self._rows,
            "logits_shape": [self._rows, *self._shape],
            "checksum": CHECKSUM,
            "segments": self._sink.segments,
            "fingerprint": dict(fingerprint),
            "layout": dict(layout or {}),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        try:
            # Opened from the temporary file: the mapping follows it through the rename.
            self._result = _open(self._tmp, self.path, _check_manifest(self._manifest, self.path))
        except CorruptEntryError as exc:
            raise RuntimeError(f"The store wrote a file that does not read back: {exc}") from exc
        return self._result


def _rows(array: np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    return None if array is None else array[start:stop]


def _manifest_path(data_path: Path) -> Path:
    return data_path.with_suffix(_MANIFEST_SUFFIX)


def _write_manifest(path: Path, manifest: Mapping[str, Any] | None) -> None:
    atomic_write_json(path, manifest)


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LogitsChunk:
    """Consecutive rows of a store entry, verified.

    Attributes
    ----------
    logits : torch.Tensor
        Float32 ``(rows, *trailing)``.
    labels : torch.Tensor or None
        ``(rows, *label_shape)`` in the labels' dtype, or None.
    sample_ids : numpy.ndarray
        ``(rows,)`` int64, or object array of str.
    start : int
        Offset of the first row in the entry.
    """

    logits: torch.Tensor
    labels: torch.Tensor | None
    sample_ids: np.ndarray
    start: int

    @property
    def rows(self) -> int:
        """The number of rows."""
        return int(self.logits.shape[0])

    @property
    def stop(self) -> int:
        """Offset one past the last row."""
        return self.start + self.rows


@dataclass(frozen=True)
class _Manifest:
    """A parsed, structurally checked manifest."""

    raw: dict[str, Any]
    segments: tuple[tuple[int, int, int, str], ...]  # offset, length, rows, digest
    stat: tuple[int, int, int] | None  # the manifest file's (inode, mtime_ns, size) when read


class StoredLogits:
    """An entry read from the store: opened and checked, its chunks verified as they are read.

    Not built directly: :func:`load_logits`, :func:`lookup` and :meth:`LogitsWriter.commit`
    return it.

    Attributes
    ----------
    path : pathlib.Path
        The data file.
    metadata : dict
        The file's ``seapig_core`` schema metadata (see the module docstring).
    manifest : dict or None
        The manifest, or None when read with ``verify=False``.
    n_samples : int
        N.
    logits_shape : tuple of int
        ``(N, *trailing)``.
    chunk_rows : tuple of int
        Rows of each stored record batch.
    """

    def __init__(
        self, path: Path, mapping: np.ndarray, reader: pa.ipc.RecordBatchFileReader, metadata: dict[str, Any],
        manifest: _Manifest | None, chunk_rows: tuple[int, ...],
    ) -> None:
        self.path = path
        self.metadata = metadata
        self.manifest = None if manifest is None else manifest.raw
        self._manifest = manifest
        self._mapping = mapping
        self._base = pa.py_buffer(mapping).address
        self._reader = reader
        self.chunk_rows = chunk_rows
        self.n_samples = int(sum(chunk_rows))
        self.logits_shape = (self.n_samples, *metadata["trailing_shape"])
        self._starts = np.concatenate([[0], np.cumsum(chunk_rows, dtype=np.int64)]).tolist()
        self._verified: set[int] = set()

    def __repr__(self) -> str:
        return f"StoredLogits({str(self.path)!r}, logits_shape={self.logits_shape}, verified={self.verified})"

    @property
    def fingerprint(self) -> str | None:
        """The entry's fingerprint key (from the manifest), or None when read unverified."""
        return None if self.manifest is None else str(self.manifest["fingerprint"]["key"])

    @property
    def verified(self) -> bool:
        """Whether chunks are verified against the manifest's checksums as they are read."""
        return self._manifest is not None

    @property
    def confidence_head(self) -> bool:
        """Whether the logits' last unit is a learned confidence head's logit (the manifest's
        ``layout``; False for entries read unverified or written before it was recorded)."""
        layout = (self.manifest or {}).get("layout")
        return isinstance(layout, dict) and layout.get("confidence_head") is True

    @property
    def has_labels(self) -> bool:
        """Whether the entry carries labels."""
        return self.metadata["label"] is not None

    # -- chunks

    def _fail(self, reason: str) -> CorruptEntryError:
        invalidated = self._invalidate()
        tail = "; its manifest was removed, so the next extraction recomputes it" if invalidated else ""
        return CorruptEntryError(f"The logits store file {str(self.path)!r} is corrupt: {reason}{tail}.")

    def _invalidate(self) -> bool:
        """Remove the manifest if it is still the one this entry was opened with (best effort)."""
        if self._manifest is None or self._manifest.stat is None:
            return False
        manifest_path = _manifest_path(self.path)
        with contextlib.suppress(OSError):
            if _stat_key(manifest_path) == self._manifest.stat:
                manifest_path.unlink()
                return True
        return False

    def _batch(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Record batch ``index``: logits view ``(rows, *trailing)``, labels copy, ids, verified."""
        rows = self.chunk_rows[index]
        low, high = 0, len(self._mapping)
        if self._manifest is not None:
            offset, length, _, digest = self._manifest.segments[index]
            low, high = offset, offset + length
            if index not in self._verified:
                if _checksum(memoryview(self._mapping[low:high])) != digest:
                    raise self._fail(
                        f"rows {self._starts[index]}-{self._starts[index + 1] - 1} (chunk {index}) fail their {CHECKSUM} "
                        "checksum"
                    )
                self._verified.add(index)
        try:
            batch = self._reader.get_batch(index)
            batch.validate(full=True)
            if batch.num_rows != rows:
                raise CorruptEntryError(f"chunk {index} holds {batch.num_rows} rows, not {rows}")
            for column in batch.columns:
                if column.null_count or column.offset:
                    raise CorruptEntryError(f"chunk {index} has null or sliced columns")
                for buffer in column.buffers():
                    if buffer is not None and buffer.size and not (
                        low <= buffer.address - self._base and buffer.address - self._base + buffer.size <= high
                    ):
                        raise CorruptEntryError(f"chunk {index} reads bytes outside its checked segment")
            values = batch.column(0).values
            width = batch.schema.field(0).type.list_size
            if values.offset or len(values) != rows * width:
                raise CorruptEntryError(f"chunk {index}'s logits do not hold {rows} x {width} values")
            start = values.buffers()[1].address - self._base
            logits = self._mapping[start : start + 4 * rows * width].view(np.ndarray).view(np.float32)
            logits = logits.reshape((rows, *self.logits_shape[1:]))
            ids_column = batch.column(1)
            ids = ids_column.to_numpy(zero_copy_only=False)
            ids = ids.astype(object) if pa.types.is_large_string(ids_column.type) else np.array(ids, dtype=np.int64)
            labels = None
            if self.has_labels:
                label = self.metadata["label"]
                column = batch.column(2)
                flat = column.flatten() if pa.types.is_fixed_size_list(column.type) else column
                labels = np.array(flat.to_numpy(zero_copy_only=False)).reshape(rows, *label["shape"])
        except CorruptEntryError as exc:
            raise self._fail(str(exc)) from exc
        except (pa.ArrowException, ValueError, TypeError, IndexError) as exc:
            raise self._fail(f"chunk {index} is not readable ({type(exc).__name__}: {exc})") from exc
        return logits, labels, ids

    def iter_chunks(self, max_rows: int | None = None, *, start: int = 0, stop: int | None = None) -> Iterator[LogitsChunk]:
        """Rows ``start:stop`` in order, as chunks of ``max_rows`` rows (the last may be shorter).

        Each stored record batch is verified against its checksum when first read. A chunk inside
        one record batch is a zero-copy view of the mapped file; one that spans record batches is
        assembled (copied).

        Parameters
        ----------
        max_rows : int, optional
            Rows per chunk. Default: the stored record batches as they are.
        start, stop : int, optional
            The row range (default: every row).

        Yields
        ------
        LogitsChunk

        Raises
        ------
        CorruptEntryError
            (a ValueError) When a record batch fails its checksum or is malformed; the entry's
            manifest is then removed so that the next extraction recomputes it.
        """
        if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
            raise ValueError(f"The 'max_rows' parameter must be a positive int or None. Got {max_rows!r} instead.")
        stop = self.n_samples if stop is None else stop
        for name, value in (("start", start), ("stop", stop)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.n_samples:
                raise ValueError(f"The '{name}' parameter must be an int in [0, {self.n_samples}]. Got {value!r} instead.")
        if start > stop:
            raise ValueError(f"The 'start' parameter must not exceed 'stop'. Got start={start}, stop={stop} instead.")
        return self._chunks(max_rows, start, stop)

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]]:
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for index in range(max(first, 0), len(self.chunk_rows)):
            low, high = self._starts[index], self._starts[index + 1]
            if low >= stop:
                break
            if high <= start:
                continue
            logits, labels, ids = self._batch(index)
            a, b = max(start, low) - low, min(stop, high) - low
            yield low + a, logits[a:b], None if labels is None else labels[a:b], ids[a:b]

    def _chunks(self, max_rows: int | None, start: int, stop: int) -> Iterator[LogitsChunk]:
        pending: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]] = []
        pending_rows = 0
        for piece in self._pieces(start, stop):
            offset, logits, labels, ids = piece
            while len(logits):
                if max_rows is None or (not pending and len(logits) >= max_rows):
                    n = len(logits) if max_rows is None else max_rows
                    yield self._chunk(offset, logits[:n], None if labels is None else labels[:n], ids[:n])
                else:
                    n = min(max_rows - pending_rows, len(logits))
                    pending.append((offset, logits[:n], None if labels is None else labels[:n], ids[:n]))
                    pending_rows += n
                    if pending_rows == max_rows:
                        yield self._joined(pending)
                        pending, pending_rows = [], 0
                offset, logits = offset + n, logits[n:]
                labels, ids = None if labels is None else labels[n:], ids[n:]
        if pending:
            yield self._joined(pending)

    def _chunk(self, start: int, logits: np.ndarray, labels: np.ndarray | None, ids: np.ndarray) -> LogitsChunk:
        tensor_labels = None
        if labels is not None:
            tensor_labels = torch.from_numpy(np.ascontiguousarray(labels))
        return LogitsChunk(torch.from_numpy(logits), tensor_labels, ids, start)

    def _joined(self, parts: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]]) -> LogitsChunk:
        if len(parts) == 1:
            return self._chunk(*parts[0])
        labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return self._chunk(parts[0][0], np.concatenate([p[1] for p in parts]), labels, np.concatenate([p[3] for p in parts]))

    def verify(self) -> None:
        """Verify every record batch now (a pass over the file, no copies).

        Raises
        ------
        CorruptEntryError
            As :meth:`iter_chunks`.
        """
        for index in range(len(self.chunk_rows)):
            self._batch(index)

    # -- the whole entry

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        """Float32 ``(N, *trailing)``, materialised (an in-memory copy), verified as read."""
        with torch.inference_mode(False):
            out = torch.empty(self.logits_shape, dtype=torch.float32)
        target = out.numpy()
        for index, (low, high) in enumerate(zip(self._starts[:-1], self._starts[1:], strict=True)):
            target[low:high] = self._batch(index)[0]
        return out

    @functools.cached_property
    def labels(self) -> torch.Tensor | None:
        """``(N, *label_shape)`` in the labels' dtype (materialised, verified), or None."""
        if not self.has_labels:
            return None
        return torch.from_numpy(np.concatenate([self._batch(i)[1] for i in range(len(self.chunk_rows))]))

    @functools.cached_property
    def sample_ids(self) -> np.ndarray:
        """``(N,)`` int64, or an object array of str (materialised, verified)."""
        return np.concatenate([self._batch(i)[2] for i in range(len(self.chunk_rows))])


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(_int(v, 1) for v in value):
        return None
    return tuple(value)


def _check_manifest(manifest: Any, data_path: Path, stat: tuple[int, int, int] | None = None) -> _Manifest:
    """Structural checks of a manifest; raises CorruptEntryError naming what is wrong."""
    problem = header_problem(manifest, MANIFEST_FORMAT, SCHEMA_VERSION)
    if problem is not None:
        other = isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
        raise (_OtherSchema if other else CorruptEntryError)(f"its manifest is not usable: {problem}")
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("key"), str):
        raise CorruptEntryError("its manifest lacks the fingerprint key")
    if manifest.get("data_file") != data_path.name:
        raise CorruptEntryError(f"its manifest describes {manifest.get('data_file')!r}, not {data_path.name!r}")
    if manifest.get("checksum") != CHECKSUM:
        raise CorruptEntryError(f"its manifest's checksum is {manifest.get('checksum')!r}, not {CHECKSUM!r}")
    size, n = manifest.get("size"), manifest.get("n_samples")
    shape = _shape(manifest.get("logits_shape"))
    raw = manifest.get("segments")
    if not _int(size, 1) or not _int(n, 1) or shape is None or shape[0] != n or not isinstance(raw, list) or len(raw) < 2:
        raise CorruptEntryError("its manifest lacks a valid size, n_samples, logits_shape or segments")
    segments = []
    position = 0
    for i, segment in enumerate(raw):
        if not isinstance(segment, dict):
            raise CorruptEntryError(f"its manifest's segment {i} is not an object")
        offset, length, rows, digest = (segment.get(k) for k in ("offset", "length", "rows", "digest"))
        last = i == len(raw) - 1
        if (
            offset != position or not _int(length, 1) or not _int(rows, 0 if last else 1) or (last and rows)
            or not isinstance(digest, str)
        ):
            raise CorruptEntryError(f"its manifest's segment {i} is malformed or does not follow segment {i - 1}")
        segments.append((offset, length, rows, digest))
        position += length
    if position != size or sum(s[2] for s in segments) != n:
        raise CorruptEntryError("its manifest's segments do not tile the file or do not add up to n_samples")
    return _Manifest(manifest, tuple(segments), stat)


def _read_manifest(manifest_path: Path, data_path: Path) -> _Manifest:
    """Read and check the manifest at ``manifest_path``; errors name the file."""
    if not manifest_path.is_file():
        kind = "missing" if not os.path.lexists(manifest_path) else "not a regular file"
        raise CorruptEntryError(f"its manifest {str(manifest_path)!r} is {kind}")
    try:
        stat = _stat_key(manifest_path)
        manifest = read_json_object(manifest_path, "logits store manifest")
    except (OSError, ValueError) as exc:
        raise CorruptEntryError(f"its manifest is not readable JSON: {exc}") from exc
    try:
        return _check_manifest(manifest, data_path, stat)
    except CorruptEntryError as exc:
        raise type(exc)(f"{exc} (in {str(manifest_path)!r})") from exc


def _parse_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise CorruptEntryError(f"it has no '{FORMAT}' format header")
    try:
        metadata = loads_json(raw, "its schema metadata")
    except ValueError as exc:
        raise CorruptEntryError(str(exc)) from exc
    problem = header_problem(metadata, FORMAT, SCHEMA_VERSION)
    if problem is not None:
        raise CorruptEntryError(problem)
    trailing = metadata.get("trailing_shape")
    if not isinstance(trailing, list) or not all(_int(v, 1) for v in trailing):
        raise CorruptEntryError(f"its metadata's trailing_shape {trailing!r} is not a list of positive ints")
    label = metadata.get("label")
    ids = metadata.get("sample_id")
    if not isinstance(ids, dict) or ids.get("dtype") not in ("int64", "string"):
        raise CorruptEntryError("its metadata's sample_id dtype is not 'int64' or 'string'")
    names = ["logits", "sample_id"] + ([] if label is None else ["label"])
    if label is not None:
        known = {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
        if not isinstance(label, dict) or label.get("dtype") not in known or _shape(label.get("shape")) is None:
            raise CorruptEntryError("its metadata's label is not a known dtype with a shape")
    expected = _schema(math.prod(trailing), ids["dtype"], label, metadata)
    if schema.names != names or not all(
        a.type == b.type and a.nullable == b.nullable for a, b in zip(schema, expected, strict=True)
    ):
        got = ", ".join(f"{f.name}: {f.type}" for f in schema)
        want = ", ".join(f"{f.name}: {f.type}" for f in expected)
        raise CorruptEntryError(f"its columns ({got}) are not the recorded layout ({want}, non-null)")
    return metadata


def _open(file: Path, path: Path, manifest: _Manifest | None) -> StoredLogits:
    """Open ``file`` (named ``path``): size, footer checksum, schema and row counts checked."""
    try:
        size = file.stat().st_size
        if manifest is not None and size != manifest.raw["size"]:
            raise CorruptEntryError(f"its data file has {size} bytes, the manifest records {manifest.raw['size']} (truncated?)")
        if size == 0:
            raise CorruptEntryError("its data file is empty")
        mapping = np.memmap(file, dtype=np.uint8, mode="c")
        if manifest is not None:
            offset, length, _, digest = manifest.segments[-1]
            if _checksum(memoryview(mapping[offset : offset + length])) != digest:
                raise CorruptEntryError(f"its footer fails its {CHECKSUM} checksum (corrupt or replaced)")
        reader = pa.ipc.open_file(pa.py_buffer(mapping))
        metadata = _parse_metadata(reader.schema)
        if manifest is not None:
            rows = tuple(s[2] for s in manifest.segments[:-1])
            if reader.num_record_batches != len(rows):
                raise CorruptEntryError(f"it holds {reader.num_record_batches} record batches, the manifest {len(rows)}")
            if list(manifest.raw["logits_shape"][1:]) != metadata["trailing_shape"]:
                raise CorruptEntryError("its logits shape differs from the manifest's")
        else:
            # Unverified: the row counts come from the batches' own headers.
            rows = tuple(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        if sum(rows) == 0:
            raise CorruptEntryError("it holds no rows")
    except CorruptEntryError:
        raise
    except FileNotFoundError as exc:
        raise CorruptEntryError("its data file is missing") from exc
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CorruptEntryError(
            f"it is not a readable Arrow IPC store file ({type(exc).__name__}: {exc})"
        ) from exc
    return StoredLogits(path, mapping, reader, metadata, manifest, rows)


def load_logits(path: str | os.PathLike[str], *, verify: bool = True) -> StoredLogits:
    """Open a store data file (``*.logits.arrow``), e.g. a path passed between pipeline tasks.

    Opening costs milliseconds whatever the size; the data is verified as it is read (see
    :class:`StoredLogits`).

    Parameters
    ----------
    path : str or os.PathLike
        The data file.
    verify : bool, default True
        Check it against the manifest beside it (``*.logits.json``): size, footer and schema at
        once, each chunk's checksum when read. ``False`` reads any well-formed file of this
        layout unchecked (e.g. one written by other tools).

    Returns
    -------
    StoredLogits

    Raises
    ------
    CorruptEntryError
        (a ValueError) If the file is missing, unreadable, not a store file, of another schema
        version, or (with ``verify``) has no readable manifest or fails verification.
    """
    data_path = Path(path)
    try:
        if not data_path.is_file():
            raise CorruptEntryError("it does not exist" if not data_path.exists() else "it is not a regular file")
        manifest = None
        if verify:
            manifest_path = _manifest_path(data_path)
            if not os.path.lexists(manifest_path):
                raise CorruptEntryError(
                    f"it has no manifest {str(manifest_path)!r} (a write interrupted between the two files, or a file "
                    "copied without it), and a store file is read only with its manifest; extract it again, or pass "
                    "verify=False to read it unverified"
                )
            manifest = _read_manifest(manifest_path, data_path)
        return _open(data_path, data_path, manifest)
    except CorruptEntryError as exc:
        reason = str(exc).rstrip(".")
        raise CorruptEntryError(f"The 'path' parameter must name a valid logits store file. {str(data_path)!r}: {reason}.") from exc


# ---------------------------------------------------------------------------- the cache policy


def _warn(data_path: Path, reason: str) -> None:
    warnings.warn(
        f"Ignoring the logits store entry {str(data_path)!r}: {reason.rstrip('.')}. Recomputing it.",
        CorruptEntryWarning,
        stacklevel=3,
    )


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))


def lookup(
    outdir: str | os.PathLike[str], prefix: str | None, fingerprint: Mapping[str, Any]
) -> StoredLogits | None:
    """The cache policy: serve entry ``prefix`` if it has ``fingerprint`` and opens cleanly.

    Parameters
    ----------
    outdir, prefix
        Name the entry (see :func:`entry_paths`).
    fingerprint : Mapping
        The fingerprint components (see the module docstring; a ``key`` is ignored and
        recomputed). A component given as a zero-argument callable is computed only when every
        other component equals the entry's: e.g. the data hash, which costs a pass over the
        loader, is skipped when the model changed.

    Returns
    -------
    StoredLogits or None
        The entry (opened and checked; chunks verified as read), or None: silently (logged at
        INFO) for a missing entry, another fingerprint or an older schema version, and with a
        :class:`CorruptEntryWarning` naming the file for a data file without a manifest, an
        unreadable or malformed manifest (any JSON, however nested, large or not UTF-8), or a
        data file that fails the checks.
    """
    data_path, manifest_path = entry_paths(outdir, prefix)
    if not os.path.lexists(manifest_path):
        if os.path.lexists(data_path):
            _warn(data_path, f"it has no manifest {str(manifest_path)!r} (an interrupted write?)")
        return None
    try:
        manifest = _read_manifest(manifest_path, data_path)
    except _OtherSchema as exc:
        logger.info("Recomputing logits store entry %s: %s.", data_path, exc)
        return None
    except CorruptEntryError as exc:
        _warn(data_path, str(exc))
        return None
    recorded = manifest.raw["fingerprint"]
    lazy = {name: value for name, value in fingerprint.items() if callable(value) and name != "key"}
    given = {name: _as_json(value) for name, value in fingerprint.items() if name not in lazy and name != "key"}
    names = (set(given) | set(lazy) | set(recorded)) - {"key"}
    changed = sorted(name for name in names if name not in lazy and recorded.get(name) != given.get(name))
    if not changed:
        given.update({name: _as_json(compute()) for name, compute in lazy.items()})
        if fingerprint_key(given) != recorded["key"]:
            changed = sorted(lazy) or ["fingerprint"]
    if changed:
        logger.info("Recomputing logits store entry %s: its %s changed.", data_path, ", ".join(changed))
        return None
    try:
        return _open(data_path, data_path, manifest)
    except CorruptEntryError as exc:
        _warn(data_path, str(exc))
        return None
