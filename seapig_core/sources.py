"""Where the pipeline's logits come from: logit files, or a model and data named by import path.

Two kinds of source feed the calibration and scoring flows:

- **Logit files** (:func:`open_logits_file`, :func:`read_logits_file`, :func:`list_logit_files`),
  read without pickle:

  ========================  ===================================================================
  ``*.logits.arrow``        a logits store entry (:mod:`seapig_core.store`), verified against
                            its manifest
  ``*.npy``                 one array of logits (``numpy.load(..., allow_pickle=False)``);
                            sample ids are the row index
  ``*.npz``                 arrays ``logits`` (or ``probabilities``) and optionally ``labels``
                            and ``sample_ids`` (string or integer), never unpickled
  ``*.parquet``,            a table with a ``logits`` (or ``probabilities``) column (fixed-size
  ``*.arrow``,              or variable lists of floats, one list per sample) and optionally
  ``*.feather``             ``label`` (or ``labels``) and ``sample_id`` columns
  ========================  ===================================================================

  **Streaming.** :func:`open_logits_file` checks a file's headers and reads no data; its
  :meth:`LogitsSource.iter_chunks` yields validated chunks of rows, so that memory follows the
  chunk size, not the file's:

  - ``.npy``: memory-mapped (copy-on-write); chunks are views of the file's pages.
  - ``.npz``: a stored member (``numpy.savez``) is memory-mapped the same way and its CRC-32
    verified as rows are read in order (or in one bounded pass for a read that starts or stops
    elsewhere); a compressed member (``numpy.savez_compressed``) is decompressed as a stream,
    chunk by chunk (zipfile checks its CRC-32 at its end); reading it from another row restarts
    or skips the stream; a Fortran-ordered compressed array cannot be read by rows and is read
    whole.
  - Parquet: row group by row group, in batches of :data:`_PARQUET_BATCH_ROWS` rows, with
    buffered column reads (a large row group never comes into memory whole).
  - Arrow IPC / Feather: the record batches of a copy-on-write memory map (zero-copy unless the
    batches are compressed, as Feather's default lz4 is: a compressed batch is decompressed
    alone, so memory follows the writer's batch size); the IPC stream format is read
    sequentially; a Feather version 1 file (before 2020) is read whole.
  - store entries: :meth:`seapig_core.store.StoredLogits.iter_chunks`, each record batch
    verified against its checksum as it is read.

  Every chunk is validated as it comes (float values, no nulls, one id per row, the same
  length for every list), so a malformed row far into a file fails the read there; headers
  (array headers against the file's size, the zip directory, the Parquet footer, the schema and
  its ``seapig_core`` metadata, the store manifest) are checked before any data is read. Sample
  ids are normalised by :func:`seapig_core._validation.check_sample_ids` and checked for repeats
  across chunks (:class:`SampleIdSet`).

  **Probabilities.** A ``probabilities`` column (tables) or array (``.npz``), or
  ``{"input": "probabilities"}`` in a table's ``seapig_core`` schema metadata (with a ``logits``
  column), marks the values as probabilities; ``probabilities=True`` does for a ``.npy``. They
  are converted chunk by chunk by :func:`seapig_core.probabilities.logits_from_probabilities`
  with the caller's ``task`` (the bundle's when scoring, the calibration settings' when
  calibrating).

  In a directory of query batches every such file is one batch, named by the file name without
  its suffix (``batch-007.npz`` -> ``batch-007``; ``batch-007.logits.arrow`` -> ``batch-007``).
- **A model and a data source** named by import path (``"package.module:function"``) plus
  keyword arguments (:func:`call_factory`), as Prefect deployments name them. The model factory
  returns a ``torch.nn.Module`` with a ``.logits(x)`` method; the data factory returns a
  DataLoader (one batch of the pipeline) or a mapping of batch names to DataLoaders.
  :func:`extract_from_factories` extracts every loader's logits into the store.

Import paths are run parameters, so whoever can start a run chooses them: they resolve only
inside an allowlist (:func:`allowed_modules`): the bundled examples (``seapig_core.examples``)
and the modules named in the ``SEAPIG_ALLOWED_MODULES`` environment variable of the process
(comma-separated, e.g. ``mypackage.models,mypackage.data``; set it on the worker, e.g. in a
deployment's ``job_variables.env``). The check runs on the *name* before anything is imported
or called; Python's standard library and builtins are refused even when listed, and the object
must be a function or class defined inside an allowed module (a re-exported ``os.system`` is
refused), reached without passing through another module.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import mmap
import os
import re
import struct
import sys
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import torch

from seapig_core import store
from seapig_core._io import MappedFileHash, check_file_stem, file_xxh3_128, loads_json, resolve_inside
from seapig_core._validation import check_positive_int, check_sample_ids

__all__ = [
    "ALLOWED_MODULES_ENV",
    "DEFAULT_ALLOWED_MODULES",
    "DEFAULT_CHUNK_ROWS",
    "LOGIT_FILE_SUFFIXES",
    "VALUE_NAMES",
    "ExtractedBatch",
    "LogitFiles",
    "LogitsData",
    "LogitsSource",
    "SampleIdSet",
    "allowed_modules",
    "call_factory",
    "check_source",
    "extract_from_factories",
    "list_logit_files",
    "open_logits_file",
    "read_logits_file",
    "resolve_import_path",
    "scan_logit_files",
]

#: Suffixes of the logit files read by :func:`read_logits_file` (store entries end in ``.logits.arrow``).
LOGIT_FILE_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".parquet", ".arrow", ".feather")
#: Rows per chunk when a logit file is streamed (65,536 rows of 100 float32 logits: 26 MB).
DEFAULT_CHUNK_ROWS = 65_536
#: Names of the column (tables) or array (``.npz``) holding each sample's values: logits, or
#: probabilities (converted to logits, see :func:`seapig_core.probabilities.logits_from_probabilities`).
VALUE_NAMES: tuple[str, ...] = ("logits", "probabilities")
_INPUT_KINDS = VALUE_NAMES
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


# ----------------------------------------------------------------------------- logit files


@dataclass(frozen=True, eq=False)
class LogitsData:
    """Logits read from a file: ``logits`` (float tensor), ``labels`` (tensor or None), ``sample_ids``."""

    logits: torch.Tensor
    labels: torch.Tensor | None
    sample_ids: np.ndarray
    path: Path

    def __len__(self) -> int:
        return int(self.logits.shape[0])


def _batch_name(path: Path) -> str | None:
    """The batch a file holds (its name without the logit suffix), or None for other files."""
    name = path.name
    if name.startswith("."):
        return None  # hidden files, e.g. a writer's temporary file
    if store.is_entry(path):
        return store.entry_prefix(path) or "logits"
    for suffix in LOGIT_FILE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


@dataclass(frozen=True)
class LogitFiles:
    """The logit files of a directory: ``batches`` (batch name -> path, sorted) and ``refused``.

    ``refused`` maps a printable file name (``ascii()`` of it) to the reason it is not a batch:
    a name that is not valid UTF-8, a symlink that resolves outside the directory, or two
    files of the same batch. Refused files are left where they are; the others can be scored.
    """

    directory: Path
    batches: dict[str, Path]
    refused: dict[str, str]


def scan_logit_files(directory: str | os.PathLike[str], name: str = "logits_dir") -> LogitFiles:
    """The logit files of a directory by batch name, and the files refused as batches.

    Hidden files (a writer's temporaries) and files of other types are ignored.

    Raises
    ------
    ValueError
        If ``directory`` does not exist or is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        state = "does not exist" if not directory.exists() else "is not a directory"
        raise ValueError(f"The '{name}' parameter must be a directory of logit files. Got {str(directory)!r}, which {state}.")
    batches: dict[str, Path] = {}
    refused: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        batch = _batch_name(path)
        if batch is None:
            continue
        label = ascii(path.name)
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            refused[label] = "its name is not valid UTF-8; rename the file"
            continue
        try:
            resolve_inside(path, directory, name)
        except ValueError as exc:
            refused[label] = str(exc)
            continue
        if not path.is_file():
            continue
        if batch in batches:
            other = batches.pop(batch)
            reason = f"the directory holds two files for batch {batch!r} ({other.name!r} and {path.name!r}); keep one"
            refused[ascii(other.name)] = refused[label] = reason
            continue
        if any(reason.startswith(f"the directory holds two files for batch {batch!r}") for reason in refused.values()):
            refused[label] = f"the directory holds several files for batch {batch!r}; keep one"
            continue
        batches[batch] = path
    return LogitFiles(directory, batches, refused)


def list_logit_files(directory: str | os.PathLike[str], name: str = "logits_dir") -> dict[str, Path]:
    """The logit files of a directory by batch name, sorted by name (see the module docstring).

    Raises
    ------
    ValueError
        If ``directory`` does not exist or is not a directory, holds no logit file, or holds a
        file refused by :func:`scan_logit_files` (named, with the reason).
    """
    found = scan_logit_files(directory, name)
    if found.refused:
        reasons = "; ".join(f"{file}: {reason}" for file, reason in found.refused.items())
        raise ValueError(f"The '{name}' directory {str(found.directory)!r} holds files that cannot be batches: {reasons}.")
    if not found.batches:
        raise ValueError(
            f"The '{name}' parameter must be a directory holding logit files ({', '.join('*' + s for s in LOGIT_FILE_SUFFIXES)}). "
            f"Got {str(found.directory)!r}, which holds none."
        )
    return found.batches


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory (no copy), also for read-only buffers.

    Read-only buffers are a memory-mapped file's pages or Arrow's immutable buffers. The
    library never writes into logits it is given (scores, labels and validation write only
    into their own outputs and workspaces), so sharing them is safe; torch's warning about
    non-writable arrays is silenced for that reason.
    """
    if not array.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def _contiguous_native(array: np.ndarray) -> np.ndarray:
    """``array`` itself when C-contiguous in native byte order, else a copy that is (one chunk)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- sample ids


class SampleIdSet:
    """The sample ids seen so far in one file (or several row ranges of it), to refuse repeats.

    Selections, the ledger and reviewers identify samples by id, so an id may appear once per
    file; a streamed file is checked chunk by chunk, across chunks. Ids are kept as sorted,
    disjoint intervals of 64-bit keys (an integer id is its own key; a string id is keyed by
    its 64-bit hash, :func:`pandas.util.hash_array`), merged as chunks arrive:

    - ids that are consecutive integers (the row index of ``.npy`` files, the running index of
      store entries and most tables) collapse to one interval: constant memory;
    - other ids take 16 bytes per sample (4M samples: 64 MB), plus a transient copy while
      intervals are merged.

    Two different string ids with the same 64-bit hash (probability about ``N**2 / 2**65``,
    4e-7 for 4M samples) are reported as a repeat: the check errs on the side of refusing.
    Sets of row ranges scored apart are combined with :meth:`merge`, which refuses an id
    present in both.
    """

    def __init__(self) -> None:
        self._levels: list[tuple[np.ndarray, np.ndarray]] = []  # sorted disjoint [start, end] intervals
        self.kind: str | None = None
        self.count = 0

    @property
    def intervals(self) -> int:
        """The number of intervals held (memory is 16 bytes each)."""
        return sum(len(starts) for starts, _ in self._levels)

    def _keys(self, ids: np.ndarray) -> np.ndarray:
        kind = "str" if ids.dtype == object else "int"
        if self.kind is None:
            self.kind = kind
        elif self.kind != kind:
            raise ValueError(f"'sample_ids' must be all integers or all strings. Got {kind} ids after {self.kind} ids.")
        if kind == "int":
            return ids.astype(np.int64, copy=False)
        return pd.util.hash_array(ids, categorize=False).view(np.int64)

    @staticmethod
    def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique keys as runs of consecutive integers ``[start, end]``."""
        breaks = np.flatnonzero(np.diff(keys) != 1)
        return keys[np.r_[0, breaks + 1]], keys[np.r_[breaks, len(keys) - 1]]

    @staticmethod
    def _inside(starts: np.ndarray, ends: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
        """For each ``[low, high]``: does it meet an interval of the sorted disjoint ``starts``/``ends``?"""
        j = np.searchsorted(starts, highs, side="right") - 1
        return (j >= 0) & (ends[np.maximum(j, 0)] >= lows)

    def _repeated(self, keys: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """Which of ``keys`` repeat (within them, or an earlier key): a bool mask."""
        dup = ks[1:][ks[1:] == ks[:-1]]
        mask = np.isin(keys, dup)
        for starts, ends in self._levels:
            mask |= self._inside(starts, ends, keys, keys)
        return mask

    def _push(self, starts: np.ndarray, ends: np.ndarray) -> None:
        self._levels.append((starts, ends))
        # Merge like a binary counter: every key is re-merged O(log N) times.
        while len(self._levels) > 1 and len(self._levels[-2][0]) <= 2 * len(self._levels[-1][0]):
            (s1, e1), (s2, e2) = self._levels.pop(), self._levels.pop()
            s, e = np.concatenate([s2, s1]), np.concatenate([e2, e1])
            order = np.argsort(s, kind="stable")
            s, e = s[order], e[order]
            first = np.r_[True, s[1:] != e[:-1] + 1]  # adjacent intervals coalesce
            index = np.flatnonzero(first)
            self._levels.append((s[index], e[np.r_[index[1:] - 1, len(e) - 1]]))

    def add(self, ids: np.ndarray) -> None:
        """Record ``ids`` (int64 or object str, as :func:`~seapig_core._validation.check_sample_ids` gives).

        Raises
        ------
        ValueError
            If an id repeats within ``ids`` or was seen before (naming up to five).
        """
        if len(ids) == 0:
            return
        keys = self._keys(ids)
        if self.kind == "int" and keys[0] <= keys[-1] and bool((np.diff(keys) == 1).all()):
            ks = keys  # consecutive already (a row index): one run, no sort, no repeat within
            starts, ends = keys[:1], keys[-1:]
            clash = False
        else:
            ks = np.sort(keys)
            starts, ends = self._runs(ks)
            clash = bool((ks[1:] == ks[:-1]).any())
        if not clash:
            clash = any(bool(self._inside(s, e, starts, ends).any()) for s, e in self._levels)
        if clash:
            mask = self._repeated(keys, ks)
            examples = list(dict.fromkeys(ids[mask].tolist()))[:5]
            raise ValueError(f"'sample_ids' must be unique. Got {int(mask.sum())} repeated id(s), e.g. {examples}.")
        self._push(starts, ends)
        self.count += len(ids)

    def merge(self, other: SampleIdSet) -> SampleIdSet:
        """Add the ids of ``other`` (e.g. another row range of the same file) to this set.

        Raises
        ------
        ValueError
            If an id is in both (naming up to five: integers; string ids by hash only).
        """
        if other.kind is None:
            return self
        if self.kind is not None and other.kind != self.kind:
            raise ValueError(f"'sample_ids' must be all integers or all strings. Got {other.kind} ids and {self.kind} ids.")
        for os_, oe in other._levels:
            for s, e in self._levels:
                hit = self._inside(s, e, os_, oe)
                if hit.any():
                    lows = np.maximum(os_[hit], s[np.searchsorted(s, oe[hit], side="right") - 1])
                    shown = lows[:5].tolist() if other.kind == "int" else [f"<string id with hash {v & 0xFFFFFFFFFFFFFFFF:x}>" for v in lows[:5].tolist()]
                    raise ValueError(f"'sample_ids' must be unique. Got ids in two row ranges, e.g. {shown}.")
        self.kind = other.kind
        for level in other._levels:
            self._push(*level)
        self.count += other.count
        return self


# ----------------------------------------------------------------------------- table layout


@dataclass(frozen=True)
class _TableLayout:
    """What an Arrow schema (Parquet or IPC) says, checked before any data is read."""

    value_column: str
    probabilities: bool
    width: int | None  # values per row, when the type or the metadata fixes it
    trailing: tuple[int, ...] | None
    label_column: str | None
    id_column: str | None
    id_kind: str
    shape_from_metadata: list[int] | None = None


def _metadata_object(schema: pa.Schema, path: Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"seapig_core")
    if not raw:
        return {}
    parsed = loads_json(raw, f"The 'seapig_core' metadata of {str(path)!r}")
    if not isinstance(parsed, dict):
        raise ValueError(f"{str(path)!r}: its 'seapig_core' metadata must be a JSON object. Got a JSON {type(parsed).__name__}.")
    return parsed


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)


def _table_layout(schema: pa.Schema, path: Path, probabilities: bool | None) -> _TableLayout:
    """Check a logits table's schema and metadata (columns, types, shape, input kind)."""
    names = schema.names
    present = [n for n in VALUE_NAMES if n in names]
    if not present:
        raise ValueError(f"{str(path)!r} must have a 'logits' (or 'probabilities') column. Got columns {names}.")
    if len(present) > 1:
        raise ValueError(f"{str(path)!r} must have either a 'logits' or a 'probabilities' column, not both. Got columns {names}.")
    column = present[0]
    meta = _metadata_object(schema, path)
    marked = meta.get("input")
    if marked is not None and marked not in _INPUT_KINDS:
        raise ValueError(f"{str(path)!r}: 'input' in its metadata must be one of {list(_INPUT_KINDS)}. Got {marked!r}.")
    is_probabilities = column == "probabilities" or marked == "probabilities"
    if column == "probabilities" and marked == "logits":
        raise ValueError(f"{str(path)!r}: its metadata says 'input': 'logits' but its column is 'probabilities'.")
    if probabilities is not None and bool(probabilities) != is_probabilities:
        said = "probabilities" if is_probabilities else "logits"
        raise ValueError(
            f"{str(path)!r} holds {said} (by its column name or metadata), but probabilities={probabilities!r} was given."
        )
    field = schema.field(column)
    dtype = field.type
    if not (pa.types.is_fixed_size_list(dtype) or pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) or not _is_numeric(
        dtype.value_type
    ):
        raise ValueError(f"{str(path)!r}: the {column!r} column must hold a list of floats per sample. Got type {dtype}.")
    width = dtype.list_size if pa.types.is_fixed_size_list(dtype) else None
    trailing = None if width is None else (width,)
    shape = meta.get("logits_shape")
    if shape:
        if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
            raise ValueError(f"{str(path)!r}: 'logits_shape' in its metadata must be a list of positive integers. Got {shape!r}.")
        product = int(np.prod(shape[1:]))
        if width is not None and product != width:
            raise ValueError(f"{str(path)!r}: 'logits_shape' {shape} in its metadata does not match the {width} logits per row.")
        width, trailing = product, tuple(shape[1:])
    label_column = next((c for c in ("label", "labels") if c in names), None)
    if label_column is not None:
        label_type = schema.field(label_column).type
        inner = label_type.value_type if (pa.types.is_fixed_size_list(label_type) or pa.types.is_list(label_type)) else label_type
        if not (_is_numeric(inner) or pa.types.is_boolean(inner)):
            raise ValueError(f"{str(path)!r}: the {label_column!r} column must hold numbers. Got type {label_type}.")
    id_kind = "index"
    id_column = "sample_id" if "sample_id" in names else None
    if id_column is not None:
        id_type = schema.field(id_column).type
        if pa.types.is_dictionary(id_type):
            id_type = id_type.value_type
        if pa.types.is_integer(id_type):
            id_kind = "int"
        elif pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
            id_kind = "str"
        else:
            raise ValueError(f"{str(path)!r}: the 'sample_id' column must hold integers or strings. Got type {id_type}.")
    return _TableLayout(column, is_probabilities, width, trailing, label_column, id_column, id_kind, shape or None)


def _list_values(array: pa.Array, layout: _TableLayout, width: int | None, path: Path) -> tuple[np.ndarray, int]:
    """Rows of a logits list column chunk as a ``(rows, width)`` float array (no copy where possible)."""
    column = layout.value_column
    if array.null_count:
        raise ValueError(f"{str(path)!r}: the {column!r} column has {array.null_count} missing row(s).")
    if pa.types.is_fixed_size_list(array.type):
        row_width = array.type.list_size
    else:
        lengths = array.value_lengths().to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            raise ValueError(f"{str(path)!r}: every row of the {column!r} column must have the same length.")
        row_width = int(lengths[0]) if lengths.size else (width or 0)
    if width is not None and len(array) and row_width != width:
        if layout.shape_from_metadata is not None and not pa.types.is_fixed_size_list(array.type):
            raise ValueError(
                f"{str(path)!r}: 'logits_shape' {layout.shape_from_metadata} in its metadata does not match the "
                f"{row_width} logits per row."
            )
        raise ValueError(f"{str(path)!r}: every row of the {column!r} column must have the same length.")
    values = array.flatten()
    if values.null_count:
        raise ValueError(
            f"{str(path)!r}: the {column!r} column has {values.null_count} missing value(s) inside its lists "
            f"(a null is not a logit; write NaN for a sample that has no valid logits)."
        )
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype != np.float64 and flat.dtype != np.float32:
        flat = flat.astype(np.float32)  # integers and half precision: float32, as the kernels compute
    return flat.reshape(len(array), row_width), row_width


def _label_values(array: pa.Array, column: str, path: Path) -> np.ndarray:
    if array.null_count:
        raise ValueError(f"{str(path)!r}: the {column!r} column has {array.null_count} missing label(s).")
    if pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        lengths = np.asarray(array.value_lengths().to_numpy(zero_copy_only=False)) if pa.types.is_list(array.type) else None
        if lengths is not None and lengths.size and (lengths != lengths[0]).any():
            raise ValueError(f"{str(path)!r}: every row of the {column!r} column must have the same length.")
        width = array.type.list_size if lengths is None else (int(lengths[0]) if lengths.size else 0)
        flat = array.flatten()
        if flat.null_count:
            raise ValueError(f"{str(path)!r}: the {column!r} column has {flat.null_count} missing label(s).")
        return np.array(flat.to_numpy(zero_copy_only=False)).reshape(len(array), width)
    return np.array(array.to_numpy(zero_copy_only=False))


def _id_values(array: pa.Array, path: Path) -> np.ndarray:
    if array.null_count:
        raise ValueError(f"{str(path)!r}: the 'sample_id' column has {array.null_count} missing id(s).")
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array.to_numpy(zero_copy_only=False)


# ----------------------------------------------------------------------------- readers

_Piece = tuple[int, np.ndarray, "np.ndarray | None", "np.ndarray | None"]  # offset, values, labels, ids


class _Reader:
    """One opened logit file of one format: headers checked at construction, data read by :meth:`pieces`."""

    format: str = ""
    trailing: tuple[int, ...] | None = None
    dtype: np.dtype = np.dtype(np.float32)
    has_labels: bool = False
    id_kind: str = "index"  # "index" (the row index), "int" or "str"
    probabilities: bool = False
    copies: float = 0.0  # anonymous copies of a chunk's values the reader makes (see chunk_bytes)
    hasher: MappedFileHash | None = None  # set by hash_while_reading() where the format maps the file

    def __init__(self, path: Path) -> None:
        self.path = path

    def hash_while_reading(self) -> None:  # noqa: B027 - formats that do not map the file read it again
        """Hash the file's bytes as :meth:`pieces` reads them (:class:`MappedFileHash`), if it can."""

    def release_hasher(self) -> None:
        hasher, self.hasher = self.hasher, None
        if hasher is not None:
            hasher.release()

    @property
    def n_samples(self) -> int:
        raise NotImplementedError

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        """Rows ``start:stop`` (``None``: to the end) as raw pieces of at most ``max_rows`` rows."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - most readers hold nothing to release
        pass


def _check_values_dtype(dtype: np.dtype, what: str, path: Path) -> np.dtype:
    if dtype.kind != "f":
        raise ValueError(f"{str(path)!r} must hold float {what}. Got dtype {dtype}.")
    return dtype


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11.7's AST constructor is not
# thread-safe: concurrent parses (the flow scores batches in threads) now and then raise
# "SystemError: AST constructor recursion depth mismatch". One header at a time.
_NPY_HEADER_LOCK = threading.Lock()


class _NpyReader(_Reader):
    """``.npy``: memory-mapped copy-on-write; chunks are views of the file's pages."""

    format = "npy"

    def __init__(self, path: Path, probabilities: bool) -> None:
        super().__init__(path)
        # numpy checks the header against the file's size before mapping anything.
        with _NPY_HEADER_LOCK:
            self.array = np.load(path, mmap_mode="c", allow_pickle=False)
        if self.array.ndim == 0:
            raise ValueError(f"{str(path)!r}: the array must have a sample axis. Got a scalar.")
        self.dtype = _check_values_dtype(self.array.dtype, "probabilities" if probabilities else "logits", path)
        self.trailing = tuple(int(d) for d in self.array.shape[1:])
        self.probabilities = probabilities
        self.copies = 0.0 if self.array.flags.c_contiguous and self.dtype.isnative else 1.0

    @property
    def n_samples(self) -> int:
        return int(self.array.shape[0])

    def hash_while_reading(self) -> None:
        # Rows are byte ranges of the file only in C order, and numpy maps from offset 0 (and to
        # the file's end) only for a header under the allocation granularity and no trailing
        # bytes: every float array numpy writes. Otherwise the file is read again at the end.
        mapped = getattr(self.array, "_mmap", None)
        data_end = self.array.offset + self.array.nbytes
        if mapped is not None and self.array.flags.c_contiguous and self.array.offset < mmap.ALLOCATIONGRANULARITY:
            if len(mapped) == data_end == self.path.stat().st_size:
                self.hasher = MappedFileHash(mapped)

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        stop = self.n_samples if stop is None else stop
        row_bytes = self.array.itemsize * int(np.prod(self.array.shape[1:], dtype=np.int64))
        for a in range(start, stop, max_rows):
            b = min(a + max_rows, stop)
            if self.hasher is not None:
                self.hasher.advance(self.array.offset + b * row_bytes)
            yield a, self.array[a:b], None, None

    def close(self) -> None:
        self.release_hasher()
        mapped, self.array = self.array, None  # type: ignore[assignment]
        _close_mapping(mapped)


class _NpzMember:
    """One array of an ``.npz``, read by rows: mapped when stored, decompressed as a stream otherwise.

    The header is checked against the member's size before anything is read. A stored member
    (``numpy.savez``) is memory-mapped and its CRC-32 is verified as rows are read in order (or
    in one bounded pass before a read that starts elsewhere). A compressed one
    (``numpy.savez_compressed``) is decompressed sequentially, chunk by chunk (zipfile checks its
    CRC-32 at the end); reading it from a row other than the next one restarts or skips the
    stream. A Fortran-ordered compressed array cannot be read by rows and is read whole.
    """

    def __init__(self, archive: zipfile.ZipFile, key: str, path: Path) -> None:
        self.archive, self.key, self.path = archive, key, path
        self.info = info = archive.getinfo(f"{key}.npy")
        if info.flag_bits & 0x1:
            raise ValueError(f"{str(path)!r}: the array {key!r} is encrypted.")
        with _NPY_HEADER_LOCK, archive.open(info) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            self.header_size = handle.tell()
        if dtype.hasobject:
            raise ValueError(f"{str(path)!r}: the array {key!r} holds Python objects, which are never unpickled.")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.file_size != self.header_size + expected:
            raise ValueError(
                f"{str(path)!r}: the array {key!r} claims shape {shape} of {dtype} ({expected:,} bytes) but holds "
                f"{info.file_size - self.header_size:,} bytes (a truncated or corrupted file)."
            )
        self.shape, self.fortran, self.dtype = tuple(int(d) for d in shape), bool(fortran_order), dtype
        self.stored = info.compress_type == zipfile.ZIP_STORED
        self._mapped: np.ndarray | None = None
        self._whole: np.ndarray | None = None
        self._stream: Any = None
        self._position = 0
        self._crc_row = 0  # rows covered by the running CRC (stored members)
        self._crc = 0
        self._crc_checked = False
        if self.stored and expected and len(self.shape) >= 1:
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"{str(path)!r}: the array {key!r} has no valid local zip header.")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            self._member_start = info.header_offset + 30 + name_length + extra_length
            self._mapped = np.memmap(
                path, dtype=dtype, mode="c", offset=self._member_start + self.header_size, shape=self.shape,
                order="F" if self.fortran else "C",
            )
            self._crc = zlib.crc32(self._raw_bytes(self._member_start, self._member_start + self.header_size))

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def streams(self) -> bool:
        """Whether rows are decompressed (an anonymous copy per chunk) rather than mapped."""
        return self._mapped is None

    def _raw_bytes(self, low: int, high: int) -> bytes:
        with open(self.path, "rb") as raw:
            raw.seek(low)
            return raw.read(high - low)

    def _verify_whole_crc(self) -> None:
        """One bounded pass over a stored member's bytes, for reads that do not start at row 0."""
        if self._crc_checked:
            return
        crc = 0
        end = self._member_start + self.info.file_size
        with open(self.path, "rb") as raw:
            raw.seek(self._member_start)
            position = self._member_start
            while position < end:
                block = raw.read(min(1 << 24, end - position))
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                position += len(block)
        self._check_crc(crc)

    def _check_crc(self, crc: int) -> None:
        if crc != self.info.CRC:
            raise ValueError(f"{str(self.path)!r}: the array {self.key!r} fails its CRC-32 check (a corrupted file).")
        self._crc_checked = True

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b``."""
        if self._mapped is not None:
            rows = self._mapped[a:b]
            if not self._crc_checked:
                if a == self._crc_row and not self.fortran:
                    self._crc = zlib.crc32(rows.view(np.uint8).reshape(-1), self._crc)
                    self._crc_row = b
                    if b == self.rows:
                        self._check_crc(self._crc)
                elif a != self._crc_row or self.fortran:
                    self._verify_whole_crc()
            return rows
        if not self.shape or int(np.prod(self.shape)) == 0:
            return np.empty((b - a, *self.shape[1:]), dtype=self.dtype)
        if self.fortran:
            if self._whole is None:
                with self.archive.open(self.info) as handle:
                    self._whole = np.lib.format.read_array(handle, allow_pickle=False)
            return self._whole[a:b]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self._stream is None or a < self._position:
            if self._stream is not None:
                self._stream.close()
            self._stream = self.archive.open(self.info)
            self._take(self.header_size)
            self._position = 0
        step = max(1, (1 << 24) // max(row_bytes, 1))
        while self._position < a:  # skip rows without keeping them
            rows = min(a - self._position, step)
            self._take(rows * row_bytes)
            self._position += rows
        data = self._take((b - a) * row_bytes)
        self._position = b
        if b == self.rows:
            self._stream.read(1)  # reach the end, where zipfile checks the CRC-32
        return np.frombuffer(data, dtype=self.dtype).reshape((b - a, *self.shape[1:]))

    def finish(self) -> None:
        """Verify the member's CRC-32 if the rows read so far did not (a read that stopped early)."""
        if self._mapped is not None:
            if not self._crc_checked:
                self._verify_whole_crc()
        elif self._stream is not None and self.rows and self._position < self.rows and not self.fortran:
            self.read(self.rows - 1, self.rows)  # decompress to the end, where zipfile checks the CRC-32

    def _take(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            n = self._stream.readinto(view[filled:])
            if not n:
                raise ValueError(f"{str(self.path)!r}: the array {self.key!r} ends early (a truncated file).")
            filled += n
        return buffer

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        mapped, self._mapped = self._mapped, None
        _close_mapping(mapped)


def _close_mapping(mapped: Any) -> None:
    """Close the memory map behind ``mapped`` (a NumPy memmap or a pyarrow MemoryMappedFile
    exposing ``_mmap``); left to the garbage collector while a view still holds it."""
    mm = getattr(mapped, "_mmap", None)
    if mm is not None:
        with contextlib.suppress(BufferError):
            mm.close()


class _NpzReader(_Reader):
    """``.npz``: arrays ``logits`` (or ``probabilities``), optionally ``labels`` and ``sample_ids``."""

    format = "npz"

    def __init__(self, path: Path, probabilities: bool | None) -> None:
        super().__init__(path)
        self.archive = zipfile.ZipFile(path)
        self.members: list[_NpzMember] = []
        try:
            arrays = {name.removesuffix(".npy") for name in self.archive.namelist() if name.endswith(".npy")}
            present = [k for k in VALUE_NAMES if k in arrays]
            if not present:
                raise ValueError(f"{str(path)!r} must hold an array named 'logits' (or 'probabilities'). Got arrays {sorted(arrays)}.")
            if len(present) > 1:
                raise ValueError(f"{str(path)!r} must hold either an array 'logits' or 'probabilities', not both.")
            key = present[0]
            self.probabilities = key == "probabilities"
            if probabilities is not None and bool(probabilities) != self.probabilities:
                raise ValueError(f"{str(path)!r} holds {key} (by its array name), but probabilities={probabilities!r} was given.")
            self.values = self._member(key)
            if not self.values.shape:
                raise ValueError(f"{str(path)!r}: the array {key!r} must have a sample axis. Got a scalar.")
            self.dtype = _check_values_dtype(self.values.dtype, key, path)
            self.trailing = self.values.shape[1:]
            label_key = next((k for k in ("labels", "label") if k in arrays), None)
            self.labels = None if label_key is None else self._member(label_key)
            self.has_labels = self.labels is not None
            id_key = next((k for k in ("sample_ids", "sample_id") if k in arrays), None)
            self.ids = None if id_key is None else self._member(id_key)
            n = self.values.rows
            if self.labels is not None and self.labels.rows != n:
                raise ValueError(
                    f"{str(path)!r} must hold one label per sample ({n}). Got labels of shape {self.labels.shape}."
                )
            if self.ids is not None:
                if len(self.ids.shape) != 1 or self.ids.rows != n:
                    raise ValueError(f"{str(path)!r}: 'sample_ids' must hold one id per sample ({n}). Got shape {self.ids.shape}.")
                self.id_kind = "str" if self.ids.dtype.kind in "US" else "int"
            self.copies = 1.0 if self.values.streams or not self.dtype.isnative or self.values.fortran else 0.0
        except BaseException:
            self.close()
            raise

    def _member(self, key: str) -> _NpzMember:
        member = _NpzMember(self.archive, key, self.path)
        self.members.append(member)
        return member

    @property
    def n_samples(self) -> int:
        return self.values.rows

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        stop = self.n_samples if stop is None else stop
        for a in range(start, stop, max_rows):
            b = min(a + max_rows, stop)
            yield (
                a,
                self.values.read(a, b),
                self.labels.read(a, b) if labels and self.labels is not None else None,
                None if self.ids is None else self.ids.read(a, b),
            )
        for member in (self.values, *([self.labels] if labels and self.labels is not None else []), *([self.ids] if self.ids else [])):
            member.finish()

    def close(self) -> None:
        for member in self.members:
            member.close()
        self.archive.close()


def _coalesce(pieces: Iterable[_Piece], max_rows: int) -> Iterator[_Piece]:
    """Join consecutive small pieces into pieces of ``max_rows`` rows (copying only when joining)."""
    pending: list[_Piece] = []
    rows = 0

    def joined() -> _Piece:
        if len(pending) == 1:
            return pending[0]
        parts = list(zip(*pending, strict=True))
        labels = None if parts[2][0] is None else np.concatenate(parts[2])
        ids = None if parts[3][0] is None else np.concatenate(parts[3])
        return parts[0][0], np.concatenate(parts[1]), labels, ids

    for piece in pieces:
        offset, values, labels, ids = piece
        while len(values):
            take = min(max_rows - rows, len(values))
            pending.append((offset, values[:take], None if labels is None else labels[:take], None if ids is None else ids[:take]))
            rows += take
            offset, values = offset + take, values[take:]
            labels, ids = None if labels is None else labels[take:], None if ids is None else ids[take:]
            if rows == max_rows:
                yield joined()
                pending, rows = [], 0
    if pending:
        yield joined()


class _TableReader(_Reader):
    """The shared part of Parquet and Arrow IPC: the layout and the conversion of record batches."""

    layout: _TableLayout

    def _setup(self, schema: pa.Schema, probabilities: bool | None) -> None:
        self.layout = _table_layout(schema, self.path, probabilities)
        self.probabilities = self.layout.probabilities
        self.trailing = self.layout.trailing
        self._width = self.layout.width
        value_type = schema.field(self.layout.value_column).type.value_type
        self.dtype = np.dtype(np.float64) if pa.types.is_float64(value_type) else np.dtype(np.float32)
        self.has_labels = self.layout.label_column is not None
        self.id_kind = self.layout.id_kind

    def columns(self, labels: bool) -> list[str]:
        layout = self.layout
        return [layout.value_column, *([layout.label_column] if labels and layout.label_column else []),
                *([layout.id_column] if layout.id_column else [])]

    def convert(self, offset: int, batch: pa.RecordBatch | pa.Table, labels: bool) -> _Piece:
        layout = self.layout
        values_column = batch.column(layout.value_column)
        if isinstance(values_column, pa.ChunkedArray):
            values_column = values_column.combine_chunks()
        values, width = _list_values(values_column, layout, self._width, self.path)
        if len(values) and self._width is None:
            self._width = width
            if self.trailing is None:
                self.trailing = (width,)
        if self.trailing is not None and len(values):
            values = values.reshape((len(values), *self.trailing))
        elif self.trailing is not None:
            values = values.reshape((0, *self.trailing))
        label_values = ids = None
        if labels and layout.label_column:
            column = batch.column(layout.label_column)
            label_values = _label_values(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, layout.label_column, self.path)
        if layout.id_column:
            column = batch.column(layout.id_column)
            ids = _id_values(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, self.path)
        return offset, values, label_values, ids


#: Rows per Parquet decode: the decoder's working set grows faster than its batch (measured at
#: 100 float32 logits per row: 16k rows ~14 MB, 64k rows ~100 MB), so larger chunks are joined
#: from batches of this size.
_PARQUET_BATCH_ROWS = 16_384


class _ParquetReader(_TableReader):
    """Parquet: row groups read as record batches with buffered column reads (bounded memory)."""

    format = "parquet"
    copies = 5.0  # decoder buffers of a 16k-row batch, the pieces of a chunk, the joined chunk, allocator slack (measured)

    def __init__(self, path: Path, probabilities: bool | None) -> None:
        super().__init__(path)
        # buffer_size > 0 and no pre-buffering: column chunks are read page by page, so a large
        # row group does not come into memory whole (measured: 1M-row row groups, 64k-row
        # batches, ~100 MB peak instead of ~800 MB).
        self.file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        self._setup(self.file.schema_arrow, probabilities)
        metadata = self.file.metadata
        counts = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        if self._starts[-1] != metadata.num_rows:
            raise ValueError(f"{str(path)!r}: its row groups hold {self._starts[-1]} rows, its footer says {metadata.num_rows}.")

    @property
    def n_samples(self) -> int:
        return int(self._starts[-1])

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        stop = self.n_samples if stop is None else stop
        groups = [i for i in range(len(self._starts) - 1) if self._starts[i] < stop and self._starts[i + 1] > start]
        if not groups:
            return iter(())
        return _coalesce(self._read(groups, start, stop, max_rows, labels), max_rows)

    def _read(self, groups: list[int], start: int, stop: int, max_rows: int, labels: bool) -> Iterator[_Piece]:
        offset = self._starts[groups[0]]
        for batch in self.file.iter_batches(
            batch_size=min(max_rows, _PARQUET_BATCH_ROWS), row_groups=groups, columns=self.columns(labels), use_threads=False
        ):
            low, high = max(offset, start), min(offset + batch.num_rows, stop)
            if high > low:
                yield self.convert(low, batch.slice(low - offset, high - low), labels)
            offset += batch.num_rows
            if offset >= stop:
                break

    def close(self) -> None:
        self.file.close()


class _ArrowReader(_TableReader):
    """Arrow IPC / Feather: record batches of a copy-on-write memory map (zero-copy when uncompressed).

    The IPC *file* format (Feather version 2, ``pyarrow.ipc.new_file``) is read by random
    access; the IPC *stream* format sequentially; a Feather version 1 file (written before
    2020) has no record batches and is read whole. Compressed batches (Feather's default lz4)
    are decompressed one batch at a time, so memory follows the writer's batch size.
    """

    format = "arrow"

    def __init__(self, path: Path, probabilities: bool | None) -> None:
        super().__init__(path)
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{str(path)!r} is empty (0 bytes).")
        self.mapping = np.memmap(path, dtype=np.uint8, mode="c")
        buffer = pa.py_buffer(self.mapping)
        self.file_reader = self.stream_buffer = self.table = None
        try:
            self.file_reader = pa.ipc.open_file(buffer)
            schema = self.file_reader.schema
        except pa.ArrowInvalid:
            try:
                schema = pa.ipc.open_stream(buffer).schema
                self.stream_buffer = buffer
            except pa.ArrowInvalid:
                self.table = feather.read_table(str(path), memory_map=True)  # Feather version 1
                schema = self.table.schema
        self._setup(schema, probabilities)
        self._rows: list[int] | None = None
        compressed = self.file_reader is not None and self.file_reader.num_record_batches and self._compressed()
        self.copies = 1.0 if compressed or self.table is not None else 0.0

    def hash_while_reading(self) -> None:
        # Uncompressed record batches are byte ranges of the mapping (compressed ones are
        # decompressed elsewhere, and a Feather version 1 file is read whole): read again then.
        if self.table is None and not self.copies:
            self.hasher = MappedFileHash(self.mapping)

    def _buffer_ends(self, batch: pa.RecordBatch) -> list[int | None]:
        """Each buffer's end as a file offset; None for one outside the mapping (decompressed)."""
        base, size = pa.py_buffer(self.mapping).address, len(self.mapping)
        return [
            buf.address + buf.size - base if base <= buf.address < base + size else None
            for column in batch.columns
            for buf in column.buffers()
            if buf is not None
        ]

    def _batch_end(self, batch: pa.RecordBatch) -> int:
        """The file offset just past ``batch``'s last buffer in the mapping (its body ends there)."""
        return max((end for end in self._buffer_ends(batch) if end is not None), default=0)

    def _compressed(self) -> bool:
        return None in self._buffer_ends(self.file_reader.get_batch(0))  # type: ignore[union-attr]

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self.file_reader is not None:
            for i in range(self.file_reader.num_record_batches):
                yield self.file_reader.get_batch(i)
        elif self.stream_buffer is not None:
            yield from pa.ipc.open_stream(self.stream_buffer)
        else:
            yield from self.table.to_batches()  # type: ignore[union-attr]

    @property
    def n_samples(self) -> int:
        if self._rows is None:
            self._rows = [batch.num_rows for batch in self._batches()]
        return int(sum(self._rows))

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        return _coalesce(self._read(start, stop, max_rows, labels), max_rows)

    def _read(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        offset = 0
        columns = self.columns(labels)
        if self.file_reader is not None and self._rows is not None:  # skip batches before start unread
            first = 0
            while first < len(self._rows) and offset + self._rows[first] <= start:
                offset += self._rows[first]
                first += 1
            batches: Iterable[pa.RecordBatch] = (self.file_reader.get_batch(i) for i in range(first, len(self._rows)))
        else:
            batches = self._batches()
        for batch in batches:
            if stop is not None and offset >= stop:
                break
            rows = batch.num_rows
            end = offset + rows if stop is None else min(offset + rows, stop)
            if end > start:
                if self.hasher is not None:
                    self.hasher.advance(self._batch_end(batch))
                batch = batch.select(columns)
                for low in range(max(offset, start), end, max_rows):
                    high = min(low + max_rows, end)
                    yield self.convert(low, batch.slice(low - offset, high - low), labels)
            offset += rows

    def close(self) -> None:
        self.release_hasher()
        self.file_reader = self.stream_buffer = self.table = None
        mapped, self.mapping = self.mapping, None  # type: ignore[assignment]
        _close_mapping(mapped)


class _StoreReader(_Reader):
    """A logits store entry (:mod:`seapig_core.store`): verified chunk by chunk as it is read."""

    format = "store"

    def __init__(self, path: Path, probabilities: bool | None) -> None:
        super().__init__(path)
        if probabilities:
            raise ValueError(f"{str(path)!r} is a logits store entry: it holds logits, but probabilities=True was given.")
        self.stored = store.load_logits(path)  # refuses an entry without its manifest
        self.trailing = tuple(int(d) for d in self.stored.logits_shape[1:])
        self.has_labels = self.stored.has_labels
        self.id_kind = "str" if self.stored.metadata["sample_id"]["dtype"] == "string" else "int"

    @property
    def n_samples(self) -> int:
        return int(self.stored.n_samples)

    def pieces(self, start: int, stop: int | None, max_rows: int, labels: bool) -> Iterator[_Piece]:
        for chunk in self.stored.iter_chunks(max_rows, start=start, stop=stop):
            chunk_labels = None if not labels or chunk.labels is None else chunk.labels.numpy()
            yield chunk.start, chunk.logits.numpy(), chunk_labels, chunk.sample_ids


# ----------------------------------------------------------------------------- sources


class LogitsSource:
    """An opened logit file: its header checked, its rows read as chunks (:meth:`iter_chunks`).

    Made by :func:`open_logits_file`. Opening reads the file's headers only (array headers,
    zip directory, Parquet footer and schema, Arrow schema, store manifest) and checks them;
    data is read, validated and converted chunk by chunk, so that memory follows the chunk
    size, not the file's (see the module docstring for what each format allows). Use it as a
    context manager, or call :meth:`close`.

    Attributes
    ----------
    path : pathlib.Path
    format : {"npy", "npz", "parquet", "arrow", "store"}
    trailing_shape : tuple of int or None
        The shape of one sample's values; None for a variable-length list column before its
        first row is read.
    dtype : numpy.dtype
        The values' float dtype as read (tables: float64 stays, anything else becomes float32).
    has_labels : bool
    id_kind : {"index", "int", "str"}
        Where sample ids come from: the row index, or an integer or string id column/array.
    probabilities : bool
        The file holds probabilities (a ``probabilities`` column or array, or ``"input":
        "probabilities"`` in a table's ``seapig_core`` metadata, or ``probabilities=True`` given
        for a ``.npy``), converted to logits by
        :func:`seapig_core.probabilities.logits_from_probabilities` chunk by chunk.
    """

    def __init__(self, reader: _Reader, name: str) -> None:
        self._reader = reader
        self.name = name
        self.path = reader.path

    def __enter__(self) -> LogitsSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LogitsSource({str(self.path)!r}, format={self.format!r}, trailing_shape={self.trailing_shape})"

    def close(self) -> None:
        """Release the file (memory maps, zip handles)."""
        self._reader.close()

    def xxh3_128(self) -> str:
        """The hex xxh3-128 of the file's bytes (:func:`seapig_core._io.file_xxh3_128`'s value).

        Opened with ``hash_while_reading=True``, a ``.npy`` or an uncompressed Arrow IPC file
        hashes the bytes of each chunk as it reads them, through its memory
        map (:class:`~seapig_core._io.MappedFileHash`): this then hashes only the bytes not
        read, and the digest is of the bytes scored. Other formats read the file again here.
        Call it while the source is open.
        """
        hasher = self._reader.hasher
        return file_xxh3_128(self.path) if hasher is None else hasher.hexdigest()

    @property
    def format(self) -> str:
        return self._reader.format

    @property
    def trailing_shape(self) -> tuple[int, ...] | None:
        return self._reader.trailing

    @property
    def dtype(self) -> np.dtype:
        return self._reader.dtype

    @property
    def has_labels(self) -> bool:
        return self._reader.has_labels

    @property
    def id_kind(self) -> str:
        return self._reader.id_kind

    @property
    def probabilities(self) -> bool:
        return self._reader.probabilities

    @property
    def n_samples(self) -> int:
        """N (an Arrow IPC stream or compressed file is scanned once, a batch at a time, to count)."""
        return self._wrap(lambda: self._reader.n_samples)

    def chunk_bytes(self, rows: int) -> int:
        """Anonymous memory reading makes per chunk of ``rows`` (copies, decoding, conversion)."""
        width = int(np.prod(self.trailing_shape)) if self.trailing_shape else 1
        copies = self._reader.copies + (1.0 if self.probabilities else 0.0)
        promoted = 4 * width if self.dtype.itemsize < 4 else 0  # half precision is scored as float32 (a copy)
        id_bytes = 0 if self.id_kind in ("index", "int") else 64  # object str ids
        return int(rows * (copies * width * self.dtype.itemsize + promoted + id_bytes + 8))

    def _fail(self, exc: BaseException) -> ValueError:
        if isinstance(exc, ValueError) and str(self.path) in str(exc):
            return exc
        if isinstance(exc, ValueError):
            return ValueError(f"The '{self.name}' file {str(self.path)!r} could not be read as logits: {exc}")
        return ValueError(f"The '{self.name}' file {str(self.path)!r} could not be read as logits ({type(exc).__name__}: {exc}).")

    def _wrap(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a bad file
            raise self._fail(exc) from exc

    def iter_chunks(
        self,
        max_rows: int = DEFAULT_CHUNK_ROWS,
        *,
        start: int = 0,
        stop: int | None = None,
        labels: bool = True,
        task: str = "multiclass",
        per_member: bool = False,
        seen: SampleIdSet | None = None,
    ) -> Iterator[store.LogitsChunk]:
        """Rows ``start:stop`` in order, as validated chunks of at most ``max_rows`` rows.

        Each chunk's values are checked (float dtype, no nulls), converted from probabilities
        when the file holds them (with ``task`` and ``per_member``), and its sample ids
        normalised (:func:`~seapig_core._validation.check_sample_ids`) and checked for repeats
        against every id seen before in this iteration, or in ``seen`` when given (pass one
        :class:`SampleIdSet` to several calls to check ids across row ranges).

        Parameters
        ----------
        max_rows : int, default :data:`DEFAULT_CHUNK_ROWS`
        start, stop : int, optional
            The row range (default every row).
        labels : bool, default True
            Read the labels too (scoring does not need them).
        task, per_member
            How probabilities are converted (ignored for logits).
        seen : SampleIdSet, optional

        Yields
        ------
        seapig_core.store.LogitsChunk
            ``logits`` (a tensor sharing the file's mapped pages where the format allows),
            ``labels``, ``sample_ids`` and ``start``.

        Raises
        ------
        ValueError
            Naming the file, for anything malformed in it (raised when the chunk is read).
        """
        max_rows = check_positive_int(max_rows, "max_rows")
        for arg, value in (("start", start), ("stop", stop)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"The '{arg}' parameter must be a non-negative int. Got {value!r} instead.")
        if start or stop is not None:
            total = self.n_samples
            stop = total if stop is None else int(stop)
            if stop > total or start > stop:
                raise ValueError(f"The row range {start}:{stop} must lie within the {total} rows of {str(self.path)!r}.")
        return self._chunks(max_rows, int(start), stop, labels, task, per_member, SampleIdSet() if seen is None else seen)

    def _chunks(
        self, max_rows: int, start: int, stop: int | None, labels: bool, task: str, per_member: bool, seen: SampleIdSet
    ) -> Iterator[store.LogitsChunk]:
        from seapig_core.probabilities import logits_from_probabilities

        pieces = self._wrap(lambda: iter(self._reader.pieces(start, stop, max_rows, labels)))
        column = "probabilities" if self.probabilities else "logits"
        while True:
            try:
                piece = next(pieces, None)
                if piece is None:
                    return
                offset, values, label_values, ids = piece
                rows = len(values)
                values = _contiguous_native(values)
                tensor = _tensor(values)
                if self.probabilities and rows:
                    try:
                        tensor = logits_from_probabilities(tensor, task, per_member=per_member, name=column)
                    except ValueError as exc:
                        raise ValueError(f"rows {offset}-{offset + rows - 1}: {exc}") from None
                sample_ids = check_sample_ids(ids, rows, name="sample_ids", start=offset)
                seen.add(sample_ids)
                label_tensor = None
                if label_values is not None:
                    label_tensor = torch.from_numpy(np.array(label_values, copy=True) if not label_values.flags.writeable else label_values)
            except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a bad file
                raise self._fail(exc) from exc
            yield store.LogitsChunk(tensor, label_tensor, sample_ids, offset)

    def read(self, *, task: str = "multiclass", per_member: bool = False, allow_empty: bool = False) -> LogitsData:
        """Every row, materialised in one preallocated tensor (1x the values' size; calibration).

        Raises
        ------
        ValueError
            As :func:`read_logits_file`.
        """
        n = self.n_samples
        logits = labels = None
        ids: list[np.ndarray] = []
        for chunk in self.iter_chunks(DEFAULT_CHUNK_ROWS, labels=True, task=task, per_member=per_member):
            if logits is None:
                logits = torch.empty((n, *chunk.logits.shape[1:]), dtype=chunk.logits.dtype)
                if chunk.labels is not None:
                    labels = torch.empty((n, *chunk.labels.shape[1:]), dtype=chunk.labels.dtype)
            logits[chunk.start : chunk.stop] = chunk.logits
            if labels is not None and chunk.labels is not None:
                labels[chunk.start : chunk.stop] = chunk.labels
            ids.append(chunk.sample_ids)
        if logits is None:
            if not allow_empty:
                shape = (0, *(self.trailing_shape or ()))
                raise ValueError(f"The '{self.name}' file {str(self.path)!r} holds no samples (logits of shape {shape}).")
            dtype = torch.float64 if self.dtype == np.float64 else torch.float32
            logits = torch.empty((0, *(self.trailing_shape or (0,))), dtype=dtype)
        sample_ids = np.concatenate(ids) if ids else np.arange(0, dtype=np.int64)
        return LogitsData(logits, labels, sample_ids, self.path)


def open_logits_file(
    path: str | os.PathLike[str],
    name: str = "logits_path",
    *,
    probabilities: bool | None = None,
    hash_while_reading: bool = False,
) -> LogitsSource:
    """Open a logit file: check its headers, read no data (see :class:`LogitsSource`).

    Parameters
    ----------
    path : str or Path
        A file of one of the formats in the module docstring.
    name : str
        Argument name used in error messages.
    probabilities : bool, optional
        Whether the file holds probabilities rather than logits. Default: as the file says (a
        ``probabilities`` column or array, or table metadata; a ``.npy`` holds logits). Given,
        it must agree with what the file says (only a ``.npy`` cannot say).
    hash_while_reading : bool, default False
        Hash the file's bytes as chunks are read, where the format maps the file, for
        :meth:`LogitsSource.xxh3_128` (one pass over memory instead of a second read).

    Returns
    -------
    LogitsSource

    Raises
    ------
    ValueError
        If the file is missing, of an unknown format, or its headers are malformed (naming
        the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The '{name}' parameter must name an existing logits file. Got {str(path)!r}, which does not exist.")
    if _batch_name(path) is None:
        raise ValueError(
            f"The '{name}' parameter must be a logits file ({', '.join('*' + s for s in LOGIT_FILE_SUFFIXES)}). Got {str(path)!r}."
        )
    if probabilities is not None and not isinstance(probabilities, bool):
        raise TypeError(f"The 'probabilities' parameter must be True, False or None. Got {type(probabilities).__name__} instead.")
    try:
        if store.is_entry(path):
            reader: _Reader = _StoreReader(path, probabilities)
        elif path.suffix == ".npy":
            reader = _NpyReader(path, bool(probabilities))
        elif path.suffix == ".npz":
            reader = _NpzReader(path, probabilities)
        elif path.suffix == ".parquet":
            reader = _ParquetReader(path, probabilities)
        else:
            reader = _ArrowReader(path, probabilities)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"The '{name}' file {str(path)!r} could not be read as logits: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a bad file
        raise ValueError(f"The '{name}' file {str(path)!r} could not be read as logits ({type(exc).__name__}: {exc}).") from exc
    if hash_while_reading:
        reader.hash_while_reading()
    return LogitsSource(reader, name)


def read_logits_file(
    path: str | os.PathLike[str],
    name: str = "logits_path",
    *,
    task: str = "multiclass",
    per_member: bool = False,
    probabilities: bool | None = None,
    allow_empty: bool = False,
) -> LogitsData:
    """Read logits (and labels and sample ids, when present) from one file, never unpickling.

    The file is read chunk by chunk (:meth:`LogitsSource.iter_chunks`) into one preallocated
    tensor: memory is the values' size (plus a chunk), whatever the format. Probabilities are
    converted to logits with ``task`` and ``per_member``.

    Parameters
    ----------
    path : str or Path
        A file of one of the formats in the module docstring.
    name : str
        Argument name used in error messages.
    task : {"multiclass", "binary", "multilabel"}, default "multiclass"
        How probabilities are converted (see :func:`seapig_core.probabilities.logits_from_probabilities`).
    per_member : bool, default False
        Probabilities carry a trailing member axis.
    probabilities : bool, optional
        See :func:`open_logits_file`.
    allow_empty : bool, default False
        Accept a file with no samples (a query batch); calibration needs samples.

    Returns
    -------
    LogitsData

    Raises
    ------
    ValueError
        If the file is missing, of an unknown format, unreadable, empty (unless
        ``allow_empty``), or malformed.
    """
    with open_logits_file(path, name, probabilities=probabilities) as source:
        data = source.read(task=task, per_member=per_member, allow_empty=allow_empty)
    if data.logits.ndim == 0:
        raise ValueError(f"The '{name}' file {str(data.path)!r} holds no samples (logits of shape {tuple(data.logits.shape)}).")
    if not data.logits.is_floating_point():
        raise ValueError(f"The '{name}' file {str(data.path)!r} must hold float logits. Got dtype {data.logits.dtype}.")
    if data.labels is not None and data.labels.shape[0] != data.logits.shape[0]:
        raise ValueError(
            f"The '{name}' file {str(data.path)!r} must hold one label per sample ({data.logits.shape[0]}). "
            f"Got labels of shape {tuple(data.labels.shape)}."
        )
    return data


# ----------------------------------------------------------------------------- factories


def check_source(files: str | None, model: str | None, data: str | None, files_name: str = "logits_path") -> str:
    """Which source a flow was given: ``"files"`` or ``"model"``; exactly one must be complete.

    Raises
    ------
    ValueError
        If both or neither source is given, or only one of ``model`` and ``data``.
    """
    has_model = model is not None or data is not None
    if files is not None and has_model:
        raise ValueError(f"Give either '{files_name}' or 'model' and 'data', not both. Got {files_name}={files!r}, model={model!r}, data={data!r}.")
    if files is not None:
        return "files"
    if model is None or data is None:
        missing = "'model' and 'data'" if model is None and data is None else ("'model'" if model is None else "'data'")
        raise ValueError(f"Give '{files_name}', or both 'model' and 'data' (import paths 'package.module:function'). Got no {missing}.")
    return "model"


#: Modules whose factories import paths may always name: the bundled examples.
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = ("seapig_core.examples",)
#: Environment variable naming further allowed modules (comma-separated module names; a name
#: allows the module and its submodules).
ALLOWED_MODULES_ENV = "SEAPIG_ALLOWED_MODULES"
# Never importable by path, even when listed: the interpreter's own modules.
_FORBIDDEN_ROOTS = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "__future__", "_frozen_importlib"}
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def allowed_modules() -> tuple[str, ...]:
    """The modules import paths may name: :data:`DEFAULT_ALLOWED_MODULES` and ``$SEAPIG_ALLOWED_MODULES``.

    Raises
    ------
    ValueError
        If the environment variable holds something that is not a module name.
    """
    listed = [part.strip() for part in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if part.strip()]
    bad = [name for name in listed if not _MODULE_NAME.fullmatch(name)]
    if bad:
        raise ValueError(
            f"The {ALLOWED_MODULES_ENV} environment variable must list module names separated by commas "
            f"(e.g. 'mypackage.models,mypackage.data'). Got {bad} in it."
        )
    return (*DEFAULT_ALLOWED_MODULES, *listed)


def _inside(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in allowed)


def _check_allowed(path: str, module_name: str, name: str, allowed: tuple[str, ...]) -> None:
    hint = (
        f"Import paths may name only modules in the allowlist {list(allowed)}: add your package to the "
        f"{ALLOWED_MODULES_ENV} environment variable of the worker (e.g. in the deployment's job_variables.env)."
    )
    if module_name.split(".")[0] in _FORBIDDEN_ROOTS:
        raise ValueError(
            f"The '{name}' parameter {path!r} names {module_name!r}, a module of Python's standard library or "
            f"its builtins, which import paths may never name. {hint}"
        )
    if not _inside(module_name, allowed):
        raise ValueError(f"The '{name}' parameter {path!r} names the module {module_name!r}, which is not allowed. {hint}")


def resolve_import_path(path: str, name: str = "factory") -> Any:
    """The object named by ``"package.module:attribute"`` (the attribute may be dotted), inside the allowlist.

    The module must be in :func:`allowed_modules` (checked on the name, before importing); the
    attribute path may pass through classes but not through other modules; the object must be a
    function or class defined in an allowed module.

    Raises
    ------
    TypeError
        If ``path`` is not a string.
    ValueError
        If it is malformed, outside the allowlist, the module cannot be imported, has no such
        attribute, or the object is not a function or class of an allowed module.
    """
    if not isinstance(path, str):
        raise TypeError(f"The '{name}' parameter must be an import path 'package.module:function'. Got {type(path).__name__} instead.")
    if not _IMPORT_PATH.fullmatch(path):
        raise ValueError(f"The '{name}' parameter must be an import path of the form 'package.module:function'. Got {path!r} instead.")
    module_name, attribute = path.split(":")
    allowed = allowed_modules()
    _check_allowed(path, module_name, name, allowed)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"The '{name}' parameter {path!r} does not resolve: cannot import module {module_name!r} ({exc}).") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"The '{name}' parameter {path!r} does not resolve: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no attribute {part!r}.")
        obj = getattr(obj, part)
        if inspect.ismodule(obj):
            raise ValueError(
                f"The '{name}' parameter {path!r} reaches the module {obj.__name__!r} through an attribute; "
                f"name it as 'module:function' instead (and only inside the allowlist {list(allowed)})."
            )
    defined_in = getattr(obj, "__module__", None) if inspect.isfunction(obj) or inspect.isclass(obj) else None
    if defined_in is None or not _inside(defined_in, allowed) or defined_in.split(".")[0] in _FORBIDDEN_ROOTS:
        where = f"defined in {defined_in!r}" if defined_in else f"an object of type {type(obj).__name__!r}, not a function or class"
        raise ValueError(
            f"The '{name}' parameter {path!r} resolves to {where}; import paths must name a function or class "
            f"defined inside the allowlist {list(allowed)}."
        )
    return obj


def call_factory(path: str, kwargs: Mapping[str, Any] | None = None, name: str = "factory") -> Any:
    """Resolve ``path`` (see :func:`resolve_import_path`) and call it with ``kwargs``.

    Raises
    ------
    TypeError, ValueError
        If the path does not resolve to a callable, or ``kwargs`` is not a mapping.
    """
    factory = resolve_import_path(path, name)
    if not callable(factory):
        raise ValueError(f"The '{name}' parameter {path!r} must name a callable. Got a {type(factory).__name__}.")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"The '{name}_kwargs' parameter must be a dict of keyword arguments. Got {type(kwargs).__name__} instead.")
    return factory(**dict(kwargs or {}))


def _loaders(data: Any, default_batch: str, path: str) -> dict[str, Iterable[Any]]:
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"The data factory {path!r} returned an empty mapping: there is no batch to extract.")
        return {check_file_stem(str(k), "batch"): v for k, v in data.items()}
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return {check_file_stem(default_batch, "batch"): data}
    raise ValueError(
        f"The data factory {path!r} must return a DataLoader or a mapping of batch names to DataLoaders. "
        f"Got a {type(data).__name__}."
    )


def _rows(loader: Any) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


@dataclass(frozen=True)
class ExtractedBatch:
    """One extracted batch: the store file, its sample count, and whether the store served it."""

    batch: str
    path: str
    samples: int
    from_cache: bool


def extract_from_factories(
    model: str,
    data: str,
    outdir: str | os.PathLike[str],
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    default_batch: str = "query",
    progress_callback: Callable[[int, int | None], None] | None = None,
    **extract_options: Any,
) -> list[ExtractedBatch]:
    """Build the model and the data from import paths and extract every batch's logits into the store.

    Parameters
    ----------
    model : str
        Import path of a factory returning a ``torch.nn.Module`` with ``.logits(x)``.
    data : str
        Import path of a factory returning a DataLoader or a mapping ``{batch name: DataLoader}``.
    outdir : str or Path
        The logits store directory; each batch is the entry ``<batch>.logits.arrow``.
    model_kwargs, data_kwargs : dict, optional
        Keyword arguments of the factories.
    default_batch : str
        Batch name of a single DataLoader.
    progress_callback : callable, optional
        ``(done_rows, total_rows_or_None)`` over all batches.
    **extract_options
        Passed to :func:`seapig_core.extract.extract_logits` (e.g. ``input_key``, ``refresh``).

    Returns
    -------
    list of ExtractedBatch
        In the data factory's order.
    """
    from seapig_core.extract import extract_logits

    net = call_factory(model, model_kwargs, name="model")
    if not isinstance(net, torch.nn.Module) or not callable(getattr(net, "logits", None)):
        raise ValueError(f"The 'model' factory {model!r} must return a torch.nn.Module with .logits(x). Got a {type(net).__name__}.")
    loaders = _loaders(call_factory(data, data_kwargs, name="data"), default_batch, data)
    sizes = {batch: _rows(loader) for batch, loader in loaders.items()}
    total = None if any(v is None for v in sizes.values()) else sum(sizes.values())  # type: ignore[arg-type]
    results: list[ExtractedBatch] = []
    done_before = 0
    for batch, loader in loaders.items():
        callback = None
        if progress_callback is not None:
            def callback(done: int, _total: int | None, _offset: int = done_before) -> None:
                progress_callback(_offset + done, total)
        extraction = extract_logits(net, loader, outdir=outdir, prefix=batch, progress_callback=callback, **extract_options)
        samples = extraction.n_samples
        if samples == 0:
            raise ValueError(f"The data factory {data!r} yielded no samples for batch {batch!r}.")
        results.append(ExtractedBatch(batch, str(extraction.path), samples, bool(extraction.from_cache)))
        done_before += samples
        if progress_callback is not None:
            progress_callback(done_before, total)
    return results
