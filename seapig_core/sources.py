"""Where the pipeline's logits come from: logit files, or a model and data named by import path.

Two kinds of source feed the calibration and scoring flows:

- **Logit files** (:func:`read_logits_file`, :func:`list_logit_files`), read without pickle:

  ========================  ===================================================================
  ``*.logits.arrow``        a logits store entry (:mod:`seapig_core.store`), verified against
                            its manifest
  ``*.npy``                 one array of logits (``numpy.load(..., allow_pickle=False)``);
                            sample ids are the row index
  ``*.npz``                 arrays ``logits`` and optionally ``labels`` and ``sample_ids``
                            (string or integer), loaded with ``allow_pickle=False``
  ``*.parquet``,            a table with a ``logits`` column (fixed-size or variable lists of
  ``*.arrow``,              floats, one list per sample) and optionally ``label`` (or
  ``*.feather``             ``labels``) and ``sample_id`` columns
  ========================  ===================================================================

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

import importlib
import inspect
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import torch

from seapig_core import store
from seapig_core._io import check_file_stem, loads_json, resolve_inside

__all__ = [
    "ALLOWED_MODULES_ENV",
    "DEFAULT_ALLOWED_MODULES",
    "LOGIT_FILE_SUFFIXES",
    "ExtractedBatch",
    "LogitFiles",
    "LogitsData",
    "allowed_modules",
    "call_factory",
    "check_source",
    "extract_from_factories",
    "list_logit_files",
    "read_logits_file",
    "resolve_import_path",
    "scan_logit_files",
]

#: Suffixes of the logit files read by :func:`read_logits_file` (store entries end in ``.logits.arrow``).
LOGIT_FILE_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".parquet", ".arrow", ".feather")
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
    """A tensor over ``array``; read-only buffers (e.g. memory-mapped Arrow) are copied first."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _ids(values: Any, n: int, path: Path) -> np.ndarray:
    if values is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(values)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"{str(path)!r}: 'sample_ids' must hold one id per sample ({n}). Got shape {ids.shape}.")
    if ids.dtype.kind in "US":
        ids = ids.astype(str).astype(object)
    elif ids.dtype.kind not in "iu" and not (ids.dtype.kind == "O" and all(isinstance(i, str) for i in ids)):
        raise ValueError(f"{str(path)!r}: 'sample_ids' must be integers or strings (no nulls). Got dtype {ids.dtype}.")
    _check_unique_ids(ids, path)
    return ids


def _check_unique_ids(ids: np.ndarray, path: Path) -> None:
    """Duplicate sample ids are refused: selections, the ledger and reviewers identify samples by id."""
    import pandas as pd

    duplicated = pd.Index(ids).duplicated()
    if duplicated.any():
        examples = list(dict.fromkeys(ids[duplicated].tolist()))[:5]
        raise ValueError(
            f"{str(path)!r}: 'sample_ids' must be unique. Got {int(duplicated.sum())} repeated id(s), e.g. {examples}."
        )


def _list_column_to_numpy(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.asarray(array.value_lengths().to_numpy(zero_copy_only=False))
        if lengths.size and (lengths != lengths[0]).any():
            raise ValueError(f"{str(path)!r}: every row of the 'logits' column must have the same length.")
        width = int(lengths[0]) if lengths.size else 0
    else:
        raise ValueError(f"{str(path)!r}: the 'logits' column must hold a list of floats per sample. Got type {array.type}.")
    if array.null_count:
        raise ValueError(f"{str(path)!r}: the 'logits' column has {array.null_count} missing row(s).")
    values = array.flatten()
    if values.null_count:
        raise ValueError(
            f"{str(path)!r}: the 'logits' column has {values.null_count} missing value(s) inside its lists "
            f"(a null is not a logit; write NaN for a sample that has no valid logits)."
        )
    values = values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32 if values.dtype != np.float64 else np.float64).reshape(len(array), width)


def _read_table(path: Path) -> LogitsData:
    table = pq.read_table(path) if path.suffix == ".parquet" else feather.read_table(path, memory_map=True)
    if "logits" not in table.column_names:
        raise ValueError(f"{str(path)!r} must have a 'logits' column. Got columns {table.column_names}.")
    logits = _list_column_to_numpy(table.column("logits"), path)
    meta = (table.schema.metadata or {}).get(b"seapig_core")
    if meta:
        parsed = loads_json(meta, f"The 'seapig_core' metadata of {str(path)!r}")
        if not isinstance(parsed, dict):
            raise ValueError(f"{str(path)!r}: its 'seapig_core' metadata must be a JSON object. Got a JSON {type(parsed).__name__}.")
        shape = parsed.get("logits_shape")
        if shape:
            if not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape[1:])):
                raise ValueError(f"{str(path)!r}: 'logits_shape' in its metadata must be a list of positive integers. Got {shape!r}.")
            if int(np.prod(shape[1:])) != logits.shape[1]:
                raise ValueError(
                    f"{str(path)!r}: 'logits_shape' {shape} in its metadata does not match the {logits.shape[1]} logits per row."
                )
            logits = logits.reshape([len(logits), *shape[1:]])
    label_column = next((c for c in ("label", "labels") if c in table.column_names), None)
    labels = None
    if label_column is not None:
        column = table.column(label_column).combine_chunks()
        if column.null_count:
            raise ValueError(f"{str(path)!r}: the {label_column!r} column has {column.null_count} missing label(s).")
        labels_np = (
            _list_column_to_numpy(column, path) if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)
            else column.to_numpy(zero_copy_only=False)
        )
        labels = _tensor(labels_np)
    ids = None
    if "sample_id" in table.column_names:
        id_column = table.column("sample_id")
        if id_column.null_count:
            raise ValueError(f"{str(path)!r}: the 'sample_id' column has {id_column.null_count} missing id(s).")
        ids = id_column.to_numpy()
    return LogitsData(_tensor(logits), labels, _ids(ids, len(logits), path), path)


def _npz_member(archive: zipfile.ZipFile, key: str, path: Path) -> np.ndarray:
    """One array of an ``.npz``, its header checked against the member's size before reading."""
    member = f"{key}.npy"
    info = archive.getinfo(member)
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        header_size = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{str(path)!r}: the array {key!r} holds Python objects, which are never unpickled.")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != header_size + expected:
        raise ValueError(
            f"{str(path)!r}: the array {key!r} claims shape {shape} of {dtype} ({expected:,} bytes) but holds "
            f"{info.file_size - header_size:,} bytes (a truncated or corrupted file)."
        )
    with archive.open(info) as handle:
        array = np.lib.format.read_array(handle, allow_pickle=False)
    return np.asfortranarray(array) if fortran_order else array


def _read_npz(path: Path) -> LogitsData:
    with zipfile.ZipFile(path) as archive:
        arrays = {name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")}
        if "logits" not in arrays:
            raise ValueError(f"{str(path)!r} must hold an array named 'logits'. Got arrays {sorted(arrays)}.")
        logits = _npz_member(archive, "logits", path)
        label_key = next((k for k in ("labels", "label") if k in arrays), None)
        labels = None if label_key is None else _tensor(_npz_member(archive, label_key, path))
        id_key = next((k for k in ("sample_ids", "sample_id") if k in arrays), None)
        ids = None if id_key is None else _npz_member(archive, id_key, path)
    if logits.ndim == 0:
        raise ValueError(f"{str(path)!r}: the array 'logits' must have a sample axis. Got a scalar.")
    return LogitsData(_tensor(logits), labels, _ids(ids, len(logits), path), path)


def read_logits_file(path: str | os.PathLike[str], name: str = "logits_path") -> LogitsData:
    """Read logits (and labels and sample ids, when present) from one file, never unpickling.

    Parameters
    ----------
    path : str or Path
        A file of one of the formats in the module docstring.
    name : str
        Argument name used in error messages.

    Returns
    -------
    LogitsData

    Raises
    ------
    ValueError
        If the file is missing, of an unknown format, unreadable, empty, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The '{name}' parameter must name an existing logits file. Got {str(path)!r}, which does not exist.")
    if _batch_name(path) is None:
        raise ValueError(
            f"The '{name}' parameter must be a logits file ({', '.join('*' + s for s in LOGIT_FILE_SUFFIXES)}). Got {str(path)!r}."
        )
    try:
        if store.is_entry(path):
            stored = store.load_logits(path)  # refuses an entry without its manifest
            data = LogitsData(stored.logits, stored.labels, stored.sample_ids, path)
        elif path.suffix == ".npy":
            # Memory-mapped: a header that claims more data than the file holds is refused by
            # numpy before anything is allocated.
            logits = np.load(path, mmap_mode="r", allow_pickle=False)
            data = LogitsData(_tensor(logits), None, _ids(None, len(logits), path), path)
        elif path.suffix == ".npz":
            data = _read_npz(path)
        else:
            data = _read_table(path)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"The '{name}' file {str(path)!r} could not be read as logits: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure parsing an untrusted file is a bad file
        raise ValueError(
            f"The '{name}' file {str(path)!r} could not be read as logits ({type(exc).__name__}: {exc})."
        ) from exc
    if data.logits.ndim == 0 or data.logits.shape[0] == 0:
        raise ValueError(f"The '{name}' file {str(path)!r} holds no samples (logits of shape {tuple(data.logits.shape)}).")
    if not data.logits.is_floating_point():
        raise ValueError(f"The '{name}' file {str(path)!r} must hold float logits. Got dtype {data.logits.dtype}.")
    if data.labels is not None and data.labels.shape[0] != data.logits.shape[0]:
        raise ValueError(
            f"The '{name}' file {str(path)!r} must hold one label per sample ({data.logits.shape[0]}). "
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
