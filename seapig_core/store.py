"""The fingerprinted on-disk logits store: one Arrow IPC file per entry, plus a JSON manifest.

An entry is named by ``outdir`` and ``prefix`` (see :func:`entry_paths`):

- ``{prefix}.logits.arrow``: an Arrow IPC *file* (``pyarrow.ipc.open_file``,
  ``pandas.read_feather``) holding one record batch with the columns

  - ``logits``: ``FixedSizeList<float32>[W]``, each sample's logits flattened row-major
    (``W`` is the product of the model's trailing output shape);
  - ``sample_id``: ``int64`` (the running index, or the batch's integer ids) or
    ``large_string`` (string ids);
  - ``label`` (when the batches carry labels): a primitive column, or
    ``FixedSizeList<dtype>[L]`` for per-sample label vectors (e.g. multilabel targets).

  The schema metadata key ``seapig_core`` holds JSON: ``format`` (``"seapig_core.logits"``),
  ``schema_version``, ``library_version``, ``n_samples``, ``logits_shape`` (the task-agnostic
  shape ``[N, *trailing]``), ``n_classes`` (the first trailing axis; 1 for a single logit),
  ``label`` (dtype and shape, or null), ``sample_id`` (dtype) and ``fingerprint``.
- ``{prefix}.logits.json``: the manifest, written *after* the data file: format, schema
  version, the data file's name, size and SHA-256, and the fingerprint.

Why this format: the same 1M x 100 float32 logits took 2.4-3.2 s to read from Parquet here, but
an Arrow IPC file memory-maps in milliseconds (DESIGN.md; ``benchmarks/bench_extract.py``
measures the store). Reads are zero-copy: the logits come back as a copy-on-write memory map
of the file, so a served entry costs page-cache pages, not process memory, until touched.

Writing streams: the logits are written batch by batch straight to their final place in the
file; ids and labels (1/W of the size) are spilled to temporary files in the same directory and
appended at the end; the Arrow headers, which need the final row count, are written last into
space reserved for them. Memory stays bounded whatever the data set's size. The file is
written under a temporary name and renamed into place (:func:`seapig_core._io.atomic_path`),
then the manifest; a killed run leaves either no entry or one that fails verification.

Trust. An entry is served only when

1. its manifest parses, has this format and schema version, and its fingerprint key equals the
   requested one;
2. the data file's size and SHA-256 equal the manifest's (a truncated, corrupted or replaced
   file, e.g. one holding a pickle payload, fails here);
3. the Arrow file opens, holds one record batch of the recorded shape, and its own metadata
   carries the same fingerprint key.

Otherwise it is recomputed with a :class:`CorruptEntryWarning`. Reading never unpickles and
never executes anything from the file: the bytes are parsed as Arrow and JSON only. The
SHA-256 detects corruption and accidental replacement; it is not a signature: whoever can write
``outdir`` can write a matching manifest too.

Fingerprint. The key is the SHA-256 of the canonical JSON of five components:

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

Caveats: a served tensor maps the file. Entries are replaced by renaming, so a later refresh
never changes a tensor already handed out (POSIX keeps the old file alive while it is mapped),
but truncating the file *in place* while it is mapped makes touching the tensor fail
(``SIGBUS``). On Windows a mapped file cannot be replaced.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import torch

from seapig_core._io import atomic_path, atomic_write_json, check_file_stem, file_sha256, header_problem, read_json
from seapig_core._version import __version__

__all__ = [
    "FORMAT",
    "MANIFEST_FORMAT",
    "SCHEMA_VERSION",
    "CorruptEntryWarning",
    "DataFingerprint",
    "LogitsWriter",
    "StoredLogits",
    "entry_paths",
    "fingerprint_key",
    "load_entry",
    "load_logits",
    "model_fingerprint",
    "read_manifest",
]

FORMAT = "seapig_core.logits"
MANIFEST_FORMAT = "seapig_core.logits.manifest"
SCHEMA_VERSION = 1
_META_KEY = b"seapig_core"
_DEFAULT_STEM = "logits"
_ALIGN = 64  # Arrow's recommended buffer alignment; also keeps the logits cache-line aligned.
# Room reserved for the Arrow headers beyond their size with the metadata known at the first
# batch: the row count and the data fingerprint, known only at the end, need a few hundred bytes.
_HEADER_SLACK = 16 * 1024
_COPY_CHUNK = 1 << 22

logger = logging.getLogger(__name__)


class CorruptEntryWarning(UserWarning):
    """A store entry was unreadable, truncated or tampered with, and is recomputed."""


class _CorruptEntry(Exception):
    """Internal: why an entry cannot be trusted."""


@dataclass(frozen=True, eq=False)
class StoredLogits:
    """An entry read from the store.

    Attributes
    ----------
    logits : torch.Tensor
        Float32 ``(N, *trailing)``, a copy-on-write memory map of the file (writes stay in
        memory, never reach the file).
    labels : torch.Tensor or None
        ``(N, *label_shape)`` in the labels' dtype, or None.
    sample_ids : numpy.ndarray
        ``(N,)`` int64, or object array of str for string ids.
    metadata : dict
        The file's ``seapig_core`` metadata (see the module docstring).
    path : pathlib.Path
        The data file.
    """

    logits: torch.Tensor
    labels: torch.Tensor | None
    sample_ids: np.ndarray
    metadata: dict[str, Any]
    path: Path

    @property
    def fingerprint(self) -> str:
        """The entry's fingerprint key."""
        return str(self.metadata["fingerprint"]["key"])


# ---------------------------------------------------------------------------- naming


def entry_paths(outdir: str | os.PathLike[str], prefix: str | None = None) -> tuple[Path, Path]:
    """The data file and manifest of the entry ``prefix`` in ``outdir``.

    ``prefix=None`` names the entry ``logits``; otherwise ``{prefix}.logits``. The prefix must
    be a plain file-name stem (no path separator, no ``..``), so the entry is inside ``outdir``.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        ``{stem}.arrow`` and ``{stem}.json``.
    """
    stem = _DEFAULT_STEM if prefix is None else f"{check_file_stem(prefix, 'prefix')}.{_DEFAULT_STEM}"
    directory = Path(outdir)
    return directory / f"{stem}.arrow", directory / f"{stem}.json"


# ---------------------------------------------------------------------------- fingerprints


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (any dtype, bfloat16 included) as a contiguous CPU buffer."""
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


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


# ---------------------------------------------------------------------------- Arrow IPC plumbing
#
# pyarrow writes a record batch in one piece, which needs every column in memory. To stream,
# the writer lays out the body itself and takes the headers from pyarrow: it serialises a
# one-row batch of the same schema and patches the row count, the buffer offsets/lengths and the
# body length into those flatbuffers (fixed-size integers, so the sizes do not change). The
# result is an ordinary Arrow IPC file, checked by reading it back with pyarrow before use.

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_PAIR = struct.Struct("<qq")
_CONTINUATION = b"\xff\xff\xff\xff"
_MAGIC = b"ARROW1"


def _fb_field(buf: bytes | bytearray, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the flatbuffer table at ``table``, or None."""
    vtable = table - _I32.unpack_from(buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else None


def _fb_ref(buf: bytes | bytearray, position: int) -> int:
    return position + _U32.unpack_from(buf, position)[0]


def _fb_vector(buf: bytes | bytearray, table: int, index: int) -> tuple[int, int]:
    """(position of the first element, length) of a vector field."""
    field = _fb_field(buf, table, index)
    if field is None:
        return 0, 0
    vector = _fb_ref(buf, field)
    return vector + 4, _U32.unpack_from(buf, vector)[0]


def _required(position: int | None, what: str) -> int:
    if position is None:
        raise RuntimeError(f"pyarrow wrote an IPC header without {what}; this pyarrow version is not supported.")
    return position


@dataclass(frozen=True)
class _Buffer:
    """One body buffer: ``source`` is 'validity' (empty), 'logits' (streamed) or a spill name."""

    source: str


@dataclass(frozen=True)
class _Layout:
    """Columns, Arrow nodes and body buffers of a store file, in schema order."""

    schema: pa.Schema
    node_widths: tuple[int, ...]  # node length = n_rows * width (FixedSizeList children)
    buffers: tuple[_Buffer, ...]


def _label_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype that stores labels of torch ``dtype``: bool, integers or floats."""
    kinds = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    kinds |= {torch.float16, torch.float32, torch.float64}
    if dtype not in kinds:
        raise TypeError(f"Labels must be bool, integer or float16/32/64 to be stored. Got {dtype} instead.")
    return torch.empty(0, dtype=dtype).numpy().dtype


def _label_type(dtype: np.dtype) -> pa.DataType:
    # Booleans are stored as uint8 (Arrow packs bool into bits, which cannot be streamed
    # batch by batch); the metadata records the dtype, and reading restores it.
    return pa.uint8() if dtype == np.bool_ else pa.from_numpy_dtype(dtype)


def _make_layout(width: int, id_kind: str, label: tuple[np.dtype, int] | None, metadata: dict[str, Any]) -> _Layout:
    fields = [pa.field("logits", pa.list_(pa.float32(), width), nullable=False)]
    nodes: list[int] = [1, width]
    buffers = [_Buffer("validity"), _Buffer("validity"), _Buffer("logits")]
    if id_kind == "string":
        fields.append(pa.field("sample_id", pa.large_string(), nullable=False))
        buffers += [_Buffer("validity"), _Buffer("sample_id.offsets"), _Buffer("sample_id.data")]
    else:
        fields.append(pa.field("sample_id", pa.int64(), nullable=False))
        buffers += [_Buffer("validity"), _Buffer("sample_id.data")]
    nodes.append(1)
    if label is not None:
        dtype, label_width = label
        if label_width == 0:
            fields.append(pa.field("label", _label_type(dtype), nullable=False))
            nodes.append(1)
            buffers += [_Buffer("validity"), _Buffer("label.data")]
        else:
            fields.append(pa.field("label", pa.list_(_label_type(dtype), label_width), nullable=False))
            nodes += [1, label_width]
            buffers += [_Buffer("validity"), _Buffer("validity"), _Buffer("label.data")]
    schema = pa.schema(fields, metadata={_META_KEY: json.dumps(metadata, allow_nan=False).encode()})
    return _Layout(schema, tuple(nodes), tuple(buffers))


def _one_row_table(layout: _Layout) -> pa.Table:
    """A one-row table of ``layout.schema`` whose serialisation gives the IPC headers."""
    arrays = []
    for field in layout.schema:
        if field.name == "sample_id":
            arrays.append(pa.array(["x"] if pa.types.is_large_string(field.type) else [0], field.type))
            continue
        kind = field.type
        if pa.types.is_fixed_size_list(kind):
            child = pa.array(np.ones(kind.list_size, dtype=kind.value_type.to_pandas_dtype()), kind.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(child, kind.list_size))
        else:
            arrays.append(pa.array(np.ones(1, dtype=kind.to_pandas_dtype()), kind))
    return pa.Table.from_arrays(arrays, schema=layout.schema)


@dataclass(frozen=True)
class _Template:
    prefix: bytes  # magic + schema message: everything before the record batch
    meta: bytes  # the record batch's flatbuffer (without continuation and length)
    tail: bytes  # end-of-stream marker, footer, footer length, magic


def _template(layout: _Layout) -> _Template:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, layout.schema) as writer:
        writer.write_table(_one_row_table(layout))
    data = sink.getvalue().to_pybytes()
    footer_len = _I32.unpack_from(data, len(data) - 10)[0]
    footer = data[len(data) - 10 - footer_len : len(data) - 10]
    blocks, count = _fb_vector(footer, _fb_ref(footer, 0), 3)
    if count != 1:
        raise RuntimeError("pyarrow wrote an unexpected IPC file layout; this pyarrow version is not supported.")
    offset, meta_len, _, body_len = struct.unpack_from("<qiiq", footer, blocks)
    meta = data[offset : offset + meta_len]
    if meta[:4] != _CONTINUATION:
        raise RuntimeError("pyarrow wrote a legacy IPC message; this pyarrow version is not supported.")
    return _Template(data[:offset], meta[8:], data[offset + meta_len + body_len :])


def _header(
    template: _Template, layout: _Layout, n_rows: int, buffers: Sequence[tuple[int, int]], body_len: int, size: int
) -> bytes:
    """Magic, schema and record-batch header for ``n_rows``, padded to exactly ``size`` bytes."""
    fb = bytearray(template.meta)
    message = _fb_ref(fb, 0)
    _I64.pack_into(fb, _required(_fb_field(fb, message, 3), "a body length"), body_len)
    batch = _fb_ref(fb, _required(_fb_field(fb, message, 2), "a record batch"))
    if _fb_field(fb, batch, 3) is not None:
        raise RuntimeError("pyarrow compressed the IPC body; the store writes it uncompressed.")
    _I64.pack_into(fb, _required(_fb_field(fb, batch, 0), "a row count"), n_rows)
    nodes, n_nodes = _fb_vector(fb, batch, 1)
    positions, n_buffers = _fb_vector(fb, batch, 2)
    if n_nodes != len(layout.node_widths) or n_buffers != len(buffers):
        raise RuntimeError("pyarrow wrote an unexpected record batch layout; this pyarrow version is not supported.")
    for i, width in enumerate(layout.node_widths):
        _PAIR.pack_into(fb, nodes + 16 * i, n_rows * width, 0)
    for i, (offset, length) in enumerate(buffers):
        _PAIR.pack_into(fb, positions + 16 * i, offset, length)
    # The declared metadata length may include padding after the flatbuffer; readers ignore it.
    padding = size - len(template.prefix) - 8 - len(fb)
    if padding < 0 or padding % 8:
        raise RuntimeError(f"The Arrow headers need {size - padding} bytes but {size} were reserved.")
    return b"".join([template.prefix, _CONTINUATION, _I32.pack(len(fb) + padding), bytes(fb), bytes(padding)])


def _tail(template: _Template, meta_len: int, body_len: int) -> bytes:
    """The template's footer with the record batch's block patched."""
    tail = bytearray(template.tail)
    footer_len = _I32.unpack_from(tail, len(tail) - 10)[0]
    start = len(tail) - 10 - footer_len
    footer = bytearray(tail[start : len(tail) - 10])
    blocks, _ = _fb_vector(footer, _fb_ref(footer, 0), 3)
    struct.pack_into("<qiiq", footer, blocks, len(template.prefix), meta_len, 0, body_len)
    tail[start : len(tail) - 10] = footer
    return bytes(tail)


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """``array``'s bytes as a flat uint8 view (no copy when contiguous; empty arrays too)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _round_up(value: int, multiple: int = _ALIGN) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------- writing


class LogitsWriter:
    """Stream batches into a store entry; atomic, bounded memory.

    Use as a context manager: :meth:`append` each batch, then :meth:`commit` once. The data file
    appears under its final name, followed by the manifest, only when the block exits without
    an exception after :meth:`commit`; otherwise nothing is left behind.

    Parameters
    ----------
    path : str or os.PathLike
        The data file, ``entry_paths(outdir, prefix)[0]``; its directory must exist.
    fingerprint_hint : Mapping, optional
        The fingerprint as far as known before the data is read (e.g. without the data
        digest). Sizes the space reserved for the headers; :meth:`commit` needs at most
        16 KiB more metadata than this.

    Examples
    --------
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> data_path, _ = entry_paths(d, "demo")
    >>> with LogitsWriter(data_path) as writer:
    ...     writer.append(torch.zeros(3, 2), None, np.arange(3))
    ...     stored = writer.commit({"key": "0" * 64})
    >>> tuple(load_logits(data_path).logits.shape)
    (3, 2)
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint_hint: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._hint = dict(fingerprint_hint or {})
        self._stack: contextlib.ExitStack | None = None
        self._file: BinaryIO | None = None
        self._spills: dict[str, BinaryIO] = {}
        self._rows = 0
        self._string_bytes = 0
        self._logits_shape: tuple[int, ...] | None = None
        self._label: tuple[torch.dtype, tuple[int, ...]] | None = None
        self._id_kind: str | None = None
        self._header_size = 0
        self._result: StoredLogits | None = None

    def __enter__(self) -> LogitsWriter:
        stack = contextlib.ExitStack()
        try:
            self._tmp = stack.enter_context(atomic_path(self.path))
            spill_dir = stack.enter_context(
                tempfile.TemporaryDirectory(dir=self.path.parent, prefix=f".{self.path.name}.spill-")
            )
            self._spill_dir = Path(spill_dir)
            self._file = stack.enter_context(open(self._tmp, "r+b"))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        for handle in self._spills.values():
            handle.close()
        if exc_type is None and self._result is None:
            # Never rename an unfinished file into place: unwind as if the block had failed.
            error = RuntimeError("LogitsWriter exited without commit(); the entry was discarded.")
            stack.__exit__(RuntimeError, error, None)
            raise error
        suppressed = stack.__exit__(exc_type, exc, tb)
        if exc_type is None:
            atomic_write_json(self.path.with_suffix(".json"), self._manifest)
        return bool(suppressed)

    # -- streaming

    def append(self, logits: torch.Tensor, labels: torch.Tensor | None, sample_ids: np.ndarray) -> None:
        """Write one batch: logits ``(B, *trailing)``, labels ``(B, ...)`` or None, ids ``(B,)``.

        The trailing shapes, label dtype and id kind must match the first batch's.
        """
        if self._file is None:
            raise RuntimeError("LogitsWriter.append() needs an open writer: use it as a context manager.")
        if self._result is not None:
            raise RuntimeError("LogitsWriter.append() called after commit().")
        rows = int(logits.shape[0])
        if labels is not None:
            _label_numpy_dtype(labels.dtype)
        id_kind = "string" if sample_ids.dtype.kind in "OUS" else "int64"
        label = None if labels is None else (labels.dtype, tuple(labels.shape[1:]))
        if self._logits_shape is None:
            self._start(tuple(logits.shape[1:]), label, id_kind)
        elif (tuple(logits.shape[1:]), label, id_kind) != (self._logits_shape, self._label, self._id_kind):
            raise ValueError(
                "Every batch written to the store must match the first batch's logits shape, label dtype/shape "
                f"and id kind {(self._logits_shape, self._label, self._id_kind)}. "
                f"Got {(tuple(logits.shape[1:]), label, id_kind)} instead."
            )
        values = logits.detach().to("cpu", torch.float32).contiguous()
        self._file.write(_raw_bytes(values.numpy()))
        if id_kind == "string":
            encoded = [str(item).encode("utf-8", "surrogatepass") for item in sample_ids]
            ends = self._string_bytes + np.cumsum([len(item) for item in encoded], dtype=np.int64)
            self._spill("sample_id.offsets", ends)
            self._spills["sample_id.data"].write(b"".join(encoded))
            if len(ends):
                self._string_bytes = int(ends[-1])
        else:
            self._spill("sample_id.data", np.asarray(sample_ids, dtype=np.int64))
        if labels is not None:
            array = labels.detach().to("cpu").contiguous().numpy()
            self._spill("label.data", array.astype(np.uint8) if array.dtype == np.bool_ else array)
        self._rows += rows

    def _start(self, shape: tuple[int, ...], label: tuple[torch.dtype, tuple[int, ...]] | None, id_kind: str) -> None:
        width = math.prod(shape)
        if width == 0:
            raise ValueError(f"Logits must have at least one value per sample. Got trailing shape {shape} instead.")
        self._logits_shape, self._label, self._id_kind = shape, label, id_kind
        names = ["sample_id.data"] + (["sample_id.offsets"] if id_kind == "string" else [])
        if label is not None:
            names.append("label.data")
        for name in names:
            self._spills[name] = open(self._spill_dir / name, "w+b")
        if id_kind == "string":
            self._spill("sample_id.offsets", np.zeros(1, dtype=np.int64))
        # Reserve room for the headers with the metadata known now; commit() fills it.
        layout = self._layout({**self._hint, "key": "0" * 64}, placeholder=True)
        template = _template(layout)
        self._header_size = _round_up(len(template.prefix) + 8 + len(template.meta) + _HEADER_SLACK)
        self._file.seek(self._header_size)

    def _spill(self, name: str, array: np.ndarray) -> None:
        self._spills[name].write(_raw_bytes(array))

    # -- finishing

    def _metadata(self, fingerprint: Mapping[str, Any], placeholder: bool = False) -> dict[str, Any]:
        shape = list(self._logits_shape or ())
        label = None
        if self._label is not None:
            dtype, label_shape = self._label
            label = {"dtype": str(dtype).removeprefix("torch."), "shape": list(label_shape)}
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            "n_samples": 0 if placeholder else self._rows,
            "logits_shape": [0 if placeholder else self._rows, *shape],
            "n_classes": shape[0] if shape else 1,
            "label": label,
            "sample_id": {"dtype": self._id_kind},
            "fingerprint": dict(fingerprint),
        }

    def _layout(self, fingerprint: Mapping[str, Any], placeholder: bool = False) -> _Layout:
        label = None
        if self._label is not None:
            dtype, label_shape = self._label
            label = (_label_numpy_dtype(dtype), math.prod(label_shape) if label_shape else 0)
        width = math.prod(self._logits_shape or ())
        return _make_layout(width, self._id_kind or "int64", label, self._metadata(fingerprint, placeholder))

    def commit(self, fingerprint: Mapping[str, Any]) -> StoredLogits:
        """Finish the file and return it memory-mapped.

        Parameters
        ----------
        fingerprint : Mapping
            The entry's fingerprint components with their ``key`` (see :func:`fingerprint_key`).

        Returns
        -------
        StoredLogits
            The entry as it will be served; its ``path`` is the final name, which it takes when
            the ``with`` block exits.

        Raises
        ------
        ValueError
            If no rows were appended.
        """
        if self._file is None or self._result is not None:
            raise RuntimeError("LogitsWriter.commit() needs an open, uncommitted writer.")
        if self._rows == 0 or self._logits_shape is None:
            raise ValueError("Cannot store an empty extraction: no rows were appended.")
        handle = self._file
        layout = self._layout(fingerprint)
        # Body: logits (already in place at header_size), then each spill, 64-byte aligned.
        body: list[tuple[int, int]] = []
        position = 0
        for buffer in layout.buffers:
            if buffer.source == "validity":
                body.append((position, 0))
                continue
            if buffer.source == "logits":
                length = self._rows * math.prod(self._logits_shape) * 4
            else:
                spill = self._spills[buffer.source]
                spill.flush()
                length = spill.seek(0, os.SEEK_END)
                position = _round_up(position)
                handle.seek(self._header_size + position)
                spill.seek(0)
                shutil.copyfileobj(spill, handle, _COPY_CHUNK)
            body.append((position, length))
            position += length
        body_len = _round_up(position)
        handle.seek(self._header_size + body_len)
        template = _template(layout)
        tail = _tail(template, self._header_size - len(template.prefix), body_len)
        handle.write(tail)
        handle.seek(0)
        handle.write(_header(template, layout, self._rows, body, body_len, self._header_size))
        handle.close()
        # Read it back through the one reader: a self-check of the headers, and the mapping
        # stays valid after the rename.
        try:
            stored = _map_file(self._tmp)
        except _CorruptEntry as exc:
            raise RuntimeError(f"The store wrote a file that does not read back: {exc}") from exc
        self._manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "library_version": __version__,
            "data_file": self.path.name,
            "size": self._tmp.stat().st_size,
            "sha256": file_sha256(self._tmp),
            "n_samples": self._rows,
            "fingerprint": dict(fingerprint),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self._result = StoredLogits(stored.logits, stored.labels, stored.sample_ids, stored.metadata, self.path)
        return self._result


# ---------------------------------------------------------------------------- reading


def _parse_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(_META_KEY)
    try:
        metadata = json.loads(raw) if raw is not None else None
    except ValueError as exc:
        raise _CorruptEntry(f"its metadata is not JSON ({exc})") from exc
    problem = header_problem(metadata, FORMAT, SCHEMA_VERSION)
    if problem is not None:
        raise _CorruptEntry(problem)
    return metadata


def _memmap(path: Path, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    # Copy-on-write: the array is writable (torch.from_numpy needs that) but writes never reach
    # the file and cost memory only for the pages written.
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape).view(np.ndarray)


def _map_file(path: Path) -> StoredLogits:
    """Open a store file: metadata and ids/labels checked, logits memory-mapped."""
    try:
        with pa.memory_map(str(path), "r") as source:
            whole = source.read_buffer()
            reader = pa.ipc.open_file(whole)
            metadata = _parse_metadata(reader.schema)
            if reader.num_record_batches != 1:
                raise _CorruptEntry(f"it holds {reader.num_record_batches} record batches, not 1")
            batch = reader.get_batch(0)
            batch.validate()
            names = batch.schema.names
            n = batch.num_rows
            shape = tuple(metadata.get("logits_shape") or ())
            if not shape or shape[0] != n or metadata.get("n_samples") != n or n == 0:
                raise _CorruptEntry(f"its shape {shape} does not match its {n} rows")

            def offset_of(array: pa.Array) -> tuple[int, np.dtype]:
                if array.offset or array.null_count:
                    raise _CorruptEntry("it has sliced or null columns")
                data = array.buffers()[1]
                dtype = np.dtype(array.type.to_pandas_dtype())
                offset = data.address - whole.address
                # pyarrow has checked the buffers against the lengths; this guards the memmap.
                if offset < 0 or offset + len(array) * dtype.itemsize > whole.size:
                    raise _CorruptEntry("a column lies outside the file")
                return offset, dtype

            logits = batch.column(names.index("logits")) if "logits" in names else None
            width = math.prod(shape[1:])
            if (
                not isinstance(logits, pa.FixedSizeListArray)
                or logits.type.value_type != pa.float32()
                or logits.type.list_size != width
            ):
                raise _CorruptEntry("its logits column is not FixedSizeList<float32> of the recorded width")
            offset, _ = offset_of(logits.values)
            values = _memmap(path, np.dtype(np.float32), offset, (n, width))

            ids_column = batch.column(names.index("sample_id")) if "sample_id" in names else None
            if ids_column is None:
                raise _CorruptEntry("it has no sample_id column")
            if pa.types.is_int64(ids_column.type):
                offset, dtype = offset_of(ids_column)
                sample_ids = _memmap(path, dtype, offset, (n,))
            elif pa.types.is_large_string(ids_column.type):
                sample_ids = np.asarray(ids_column.to_pylist(), dtype=object)
            else:
                raise _CorruptEntry(f"its sample_id column has type {ids_column.type}")

            labels = None
            label_meta = metadata.get("label")
            if "label" in names:
                column = batch.column(names.index("label"))
                if not isinstance(label_meta, dict):
                    raise _CorruptEntry("it has a label column but no label metadata")
                label_shape = tuple(label_meta.get("shape", ()))
                if isinstance(column, pa.FixedSizeListArray):
                    if column.offset or not label_shape or column.type.list_size != math.prod(label_shape):
                        raise _CorruptEntry("its label column does not match the recorded label shape")
                    offset, dtype = offset_of(column.values)
                elif label_shape:
                    raise _CorruptEntry("its label column does not match the recorded label shape")
                else:
                    offset, dtype = offset_of(column)
                array = _memmap(path, dtype, offset, (n, *label_shape))
                labels = torch.from_numpy(array)
                if label_meta.get("dtype") == "bool":
                    labels = labels.to(torch.bool)
                elif str(labels.dtype).removeprefix("torch.") != label_meta.get("dtype"):
                    raise _CorruptEntry(f"its labels are {labels.dtype}, not {label_meta.get('dtype')}")
            elif label_meta is not None:
                raise _CorruptEntry("its metadata describes labels it does not have")
            tensor = torch.from_numpy(values).reshape(shape)
    # Any parse failure of a file we did not (or no longer) recognise means "unreadable".
    except (
        pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
        NotImplementedError, RuntimeError,
    ) as exc:
        raise _CorruptEntry(f"it is not a readable Arrow IPC store file ({type(exc).__name__}: {exc})") from exc
    return StoredLogits(tensor, labels, sample_ids, metadata, path)


def _read_manifest_file(manifest_path: Path) -> dict[str, Any]:
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise _CorruptEntry(f"its manifest is not readable JSON ({type(exc).__name__})") from exc
    problem = header_problem(manifest, MANIFEST_FORMAT, SCHEMA_VERSION)
    if problem is not None:
        raise _CorruptEntry(f"its manifest is not usable: {problem}")
    fingerprint = manifest.get("fingerprint")
    if (
        not isinstance(fingerprint, dict)
        or not isinstance(manifest.get("sha256"), str)
        or not isinstance(manifest.get("size"), int)
    ):
        raise _CorruptEntry("its manifest lacks the fingerprint, size or sha256")
    return manifest


def _verify(data_path: Path, manifest: Mapping[str, Any]) -> None:
    try:
        size = data_path.stat().st_size
    except OSError as exc:
        raise _CorruptEntry("its data file is missing") from exc
    if size != manifest["size"]:
        raise _CorruptEntry(f"its data file has {size} bytes, the manifest records {manifest['size']} (truncated?)")
    if file_sha256(data_path) != manifest["sha256"]:
        raise _CorruptEntry("its data file's SHA-256 differs from the manifest's (corrupt or replaced)")


def _warn(data_path: Path, reason: str) -> None:
    warnings.warn(
        f"Ignoring the logits store entry {str(data_path)!r}: {reason}. Recomputing it.",
        CorruptEntryWarning,
        stacklevel=3,
    )


def read_manifest(outdir: str | os.PathLike[str], prefix: str | None = None) -> dict[str, Any] | None:
    """The manifest of entry ``prefix`` in ``outdir``, or None when there is no usable one.

    A missing entry returns None silently; a data file without a manifest (a run killed
    between the two writes) or an unreadable manifest returns None with a
    :class:`CorruptEntryWarning`. The data file itself is not read.
    """
    data_path, manifest_path = entry_paths(outdir, prefix)
    if not manifest_path.exists():
        if data_path.exists():
            _warn(data_path, "it has no manifest (an interrupted write?)")
        return None
    try:
        return _read_manifest_file(manifest_path)
    except _CorruptEntry as exc:
        _warn(data_path, str(exc))
        return None


def load_entry(
    outdir: str | os.PathLike[str],
    prefix: str | None,
    key: str,
    manifest: Mapping[str, Any] | None = None,
) -> StoredLogits | None:
    """Serve entry ``prefix`` if its fingerprint key is ``key`` and it verifies; else None.

    Parameters
    ----------
    outdir, prefix
        Name the entry (see :func:`entry_paths`).
    key : str
        The requested fingerprint key (:func:`fingerprint_key`).
    manifest : Mapping, optional
        The entry's manifest if already read with :func:`read_manifest`.

    Returns
    -------
    StoredLogits or None
        None for a missing entry or another fingerprint (silently, logged at INFO), and for an
        entry that fails verification (with a :class:`CorruptEntryWarning`).
    """
    data_path, _ = entry_paths(outdir, prefix)
    if manifest is None:
        manifest = read_manifest(outdir, prefix)
        if manifest is None:
            return None
    if manifest["fingerprint"].get("key") != key:
        logger.info("Logits store entry %s has another fingerprint; recomputing.", data_path)
        return None
    try:
        _verify(data_path, manifest)
        stored = _map_file(data_path)
        if stored.metadata.get("fingerprint", {}).get("key") != key:
            raise _CorruptEntry("its file's fingerprint differs from its manifest's")
    except _CorruptEntry as exc:
        _warn(data_path, str(exc))
        return None
    return stored


def load_logits(path: str | os.PathLike[str], *, verify: bool = True) -> StoredLogits:
    """Read a store data file (``*.logits.arrow``), e.g. a path passed between pipeline tasks.

    Parameters
    ----------
    path : str or os.PathLike
        The data file.
    verify : bool, default True
        Check its size and SHA-256 against the manifest beside it (``*.logits.json``).

    Returns
    -------
    StoredLogits

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a store file, of another schema version, or
        (with ``verify``) has no manifest or fails verification.
    """
    data_path = Path(path)
    try:
        if not data_path.is_file():
            raise _CorruptEntry("it does not exist")
        if verify:
            manifest = _read_manifest_file(data_path.with_suffix(".json"))
            _verify(data_path, manifest)
        return _map_file(data_path)
    except _CorruptEntry as exc:
        raise ValueError(
            f"The 'path' parameter must name a valid logits store file. {str(data_path)!r}: {exc}."
        ) from exc
