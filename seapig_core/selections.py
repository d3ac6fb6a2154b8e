"""Selections: which query samples a selector accepts, as a Parquet table, and its summary.

:func:`selections_table` turns a :class:`~seapig_core.bundle.SelectorBundle`, query logits and
sample ids into one row per sample; :func:`write_selections` writes it atomically, replacing an
earlier file of the same batch (:func:`selections_path`); :func:`summarize_selections` gives
the numbers a reviewer compares with the calibration (rejection rate against the expected one,
drift of the query scores).

Streaming (what :func:`seapig_core.pipeline.score_file` does with a file):
:func:`iter_selections` reads a :class:`seapig_core.sources.LogitsSource` chunk by chunk,
validates each chunk once for the bundle (:meth:`~seapig_core.bundle.SelectorBundle.check_query`)
and scores it in one pass (:func:`seapig_core.kernels.score_pass`: every score, the prediction,
the runner-up and the certainty ratio), yielding one Arrow record batch per chunk;
:class:`SelectionsWriter` writes them as row groups of one Parquet file, atomically;
:class:`SelectionSummary` accumulates the summary and the review queue in bounded memory, and
merges with the summaries of other row ranges (:func:`merge_summaries`). The streamed file has
the schema and metadata a table written by :func:`write_selections` has
(:func:`selections_schema`).

Parquet schema (``schema_version`` 1), one row per query sample, in input order:

- ``sample_id``: the caller's ids (string or integer); the row index when none were given;
- ``prediction``: int64 predicted class (multilabel: list of 0/1 per label); ``-1`` for a
  sample with non-finite logits;
- ``score``: the primary score (higher = more uncertain; NaN for non-finite logits);
- ``selected``: bool, ``score < threshold`` (never True for non-finite logits);
- ``alternate_label``: int64 runner-up class (see :func:`seapig_core.kernels.runner_up`);
- ``certainty_ratio``: ``p_(2) / p_(1)`` at the bundle's temperature, in (0, 1];
- ``score_<name>`` and ``selected_<name>``: every further score of the bundle, with its own
  threshold.

The file's schema metadata key ``seapig_core`` holds JSON: ``format``
(``"seapig_core.selections"``), ``schema_version``, ``library_version``, ``batch``, the primary
score, its threshold and temperature, the bundle's version, manifest SHA-256 and path, and the
input's fingerprint (``logits_sha256`` or ``logits_xxh3_128``, see
:func:`seapig_core.pipeline.input_fingerprint`) when written by the pipeline. Files are
written without timestamps, so scoring the same batch with the same bundle gives the same bytes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seapig_core._io import atomic_path, check_file_stem, ensure_writable_dir, header_problem
from seapig_core._validation import check_positive_int, check_sample_ids
from seapig_core._version import __version__
from seapig_core.bundle import SelectorBundle
from seapig_core.kernels import PassOutputs, score_pass

__all__ = [
    "EXACT_SUMMARY_SAMPLES",
    "SELECTIONS_FORMAT",
    "SELECTIONS_SCHEMA_VERSION",
    "SELECTIONS_SUFFIX",
    "SelectionSummary",
    "SelectionsWriter",
    "check_source_fits",
    "iter_selections",
    "merge_summaries",
    "read_selections",
    "selections_metadata",
    "selections_path",
    "selections_schema",
    "selections_table",
    "summarize_selections",
    "write_selections",
    "write_selections_stream",
]

SELECTIONS_FORMAT = "seapig_core.selections"
SELECTIONS_SCHEMA_VERSION = 1
SELECTIONS_SUFFIX = ".selections.parquet"
_META_KEY = b"seapig_core"
#: Batches with at most this many finite scores are compared with the calibration on the
#: scores themselves (kept while the batch streams: at most 80 kB); larger ones from counts
#: per calibration value, which give the same KS statistic and, scipy's ``ks_2samp`` being
#: asymptotic beyond 10,000 samples, the same p-value (see :class:`SelectionSummary`).
EXACT_SUMMARY_SAMPLES = 10_000


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy()


# ----------------------------------------------------------------------------- one pass


def _columns(bundle: SelectorBundle, out: PassOutputs, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The selections columns of one scored chunk (multilabel ``prediction`` stays 2-D here)."""
    primary = _numpy(out.scores[bundle.primary_name])
    # Comparisons in NumPy: the same float32 (or float64) comparison as the scores' select(),
    # without a torch parallel region per chunk (milliseconds each on a busy host).
    columns: dict[str, np.ndarray] = {
        "sample_id": sample_ids,
        "prediction": _numpy(out.prediction),  # type: ignore[arg-type]
        "score": primary,
        "selected": primary < bundle.threshold,  # NaN < t is False: never selected
        "alternate_label": _numpy(out.runner_up),  # type: ignore[arg-type]
        "certainty_ratio": _numpy(out.certainty_ratio),  # type: ignore[arg-type]
    }
    for name, score in bundle.scores.items():
        if name == bundle.primary_name:
            continue
        values = _numpy(out.scores[name])
        columns[f"score_{name}"] = values
        columns[f"selected_{name}"] = values < score.threshold  # NaN < t is False
    return columns


def _frame(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    frame = dict(columns)
    prediction = frame["prediction"]
    if prediction.ndim == 2:  # multilabel: one 0/1 vector per sample
        frame["prediction"] = list(prediction)
    return pd.DataFrame(frame)


def _score_chunk(bundle: SelectorBundle, logits: Any, sample_ids: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """Validate one chunk for the bundle once and score it in one pass: every score, the labels."""
    canon = bundle.check_query(logits, name)
    out = score_pass(canon, list(bundle.scores), bundle.temperature, labels=True)
    return _columns(bundle, out, sample_ids)


def selections_table(bundle: SelectorBundle, query_logits: Any, sample_ids: Any = None) -> pd.DataFrame:
    """Score and select query samples with a bundle: one row per sample (see the module docstring).

    The logits are validated once (:meth:`~seapig_core.bundle.SelectorBundle.check_query`) and
    read once (:func:`seapig_core.kernels.score_pass`: every score of the bundle, the
    prediction, the runner-up and the certainty ratio in one pass). For a file, prefer the
    streaming :func:`iter_selections` (what :func:`seapig_core.pipeline.score_file` does).

    Parameters
    ----------
    bundle : SelectorBundle
        The fitted selector.
    query_logits : torch.Tensor or numpy.ndarray
        Logits shaped for the bundle's task, with its number of logits per sample; rows with
        non-finite values are scored NaN and rejected. Zero rows give an empty table.
    sample_ids : array-like, optional
        One id per row (strings or integers); default the row index.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    ValueError
        If the logits do not fit the bundle (task layout, class count), or the ids do not
        match them.
    """
    if not isinstance(bundle, SelectorBundle):
        raise TypeError(f"The 'bundle' parameter must be a SelectorBundle. Got {type(bundle).__name__} instead.")
    canon = bundle.check_query(query_logits)
    ids = check_sample_ids(sample_ids, canon.n_samples)
    out = score_pass(canon, list(bundle.scores), bundle.temperature, labels=True)
    return _frame(_columns(bundle, out, ids))


# ----------------------------------------------------------------------------- Arrow / Parquet


def _float_dtype(dtype: Any) -> np.dtype:
    """The scores' dtype for logits of ``dtype`` (float64 stays; anything else is scored in float32)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def selections_schema(bundle: SelectorBundle, id_kind: str = "int", dtype: Any = np.float32) -> pa.Schema:
    """The Arrow schema of a selections file, without reading any data.

    The same schema (and pandas metadata) as ``pyarrow.Table.from_pandas`` gives a
    :func:`selections_table` of such logits, so that streamed files and tables written by
    :func:`write_selections` are alike.

    Parameters
    ----------
    bundle : SelectorBundle
    id_kind : {"int", "str", "index"}
        Integer ids (or the row index) or string ids.
    dtype : numpy dtype
        The logits' float dtype (float64 scores float64; anything else float32).
    """
    float_dtype = _float_dtype(dtype)
    multilabel = bundle.task == "multilabel"
    example: dict[str, np.ndarray] = {
        "sample_id": np.array(["x"], dtype=object) if id_kind == "str" else np.zeros(1, dtype=np.int64),
        "prediction": np.zeros((1, bundle.n_units) if multilabel else 1, dtype=np.int64),
        "score": np.zeros(1, dtype=float_dtype),
        "selected": np.zeros(1, dtype=bool),
        "alternate_label": np.zeros(1, dtype=np.int64),
        "certainty_ratio": np.zeros(1, dtype=float_dtype),
    }
    for name in list(bundle.scores)[1:]:
        example[f"score_{name}"] = np.zeros(1, dtype=float_dtype)
        example[f"selected_{name}"] = np.zeros(1, dtype=bool)
    return pa.Schema.from_pandas(_frame(example), preserve_index=False)


def _record_batch(columns: Mapping[str, np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        value = columns[field.name]
        if field.name == "prediction" and value.ndim == 2:
            n, k = value.shape
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(value.reshape(-1)), type=field.type))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def selections_metadata(metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``seapig_core`` metadata of a selections file: format, schema and library versions, and ``metadata``."""
    return {
        "format": SELECTIONS_FORMAT,
        "schema_version": SELECTIONS_SCHEMA_VERSION,
        "library_version": __version__,
        **(metadata or {}),
    }


def _with_metadata(schema: pa.Schema, metadata: Mapping[str, Any] | None) -> pa.Schema:
    schema_meta = dict(schema.metadata or {})
    schema_meta[_META_KEY] = json.dumps(selections_metadata(metadata), sort_keys=True, allow_nan=False, default=str).encode()
    return schema.with_metadata(schema_meta)


class SelectionsWriter:
    """Write a selections file record batch by record batch (one Parquet row group each), atomically.

    A context manager: the file is written under an owned temporary name
    (:func:`seapig_core._io.atomic_path`) and moved into place when the block ends without an
    exception; if anything fails, ``path`` keeps its previous content (or stays absent) and no
    temporary file is left. Memory holds one row group at a time, whatever the file's size.

    Parameters
    ----------
    path : str or Path
        Destination, e.g. :func:`selections_path`; its directory is created if needed.
    schema : pyarrow.Schema
        :func:`selections_schema`.
    metadata : dict, optional
        JSON-serialisable entries added to the file's ``seapig_core`` metadata; more can be
        added before the file is closed (:meth:`update_metadata`).

    Examples
    --------
    >>> with SelectionsWriter(path, selections_schema(bundle), {"batch": "b"}) as writer:  # doctest: +SKIP
    ...     for batch in iter_selections(bundle, source):
    ...         writer.write(batch)
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema, metadata: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.schema = _with_metadata(schema, metadata)
        self.rows = 0
        self._metadata = dict(metadata or {})
        self._late: dict[str, Any] = {}
        self._tmp: Path | None = None
        self._stack: contextlib.ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None

    def update_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Add or replace ``seapig_core`` metadata entries, written when the file is closed.

        For what is known only once every batch is written (the input's fingerprint hashed
        while it was read). Parquet keeps the metadata in its footer, written at the close:
        the file's Arrow schema (``ARROW:schema``) and ``seapig_core`` entries are replaced
        there, and read back before the file is moved into place.
        """
        if self._writer is None:
            raise RuntimeError("SelectionsWriter.update_metadata() outside its 'with' block.")
        json.dumps(dict(metadata), allow_nan=False, default=str)  # refuse now what could not be written
        self._late.update(metadata)

    def __enter__(self) -> SelectionsWriter:
        ensure_writable_dir(self.path.parent, "output_dir")
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            # Dictionary encoding only where it pays (labels: at most K distinct values); on scores
            # and ids it builds a dictionary per column chunk only to give it up (2.3x the write time).
            labels = [name for name in ("prediction", "alternate_label") if name in self.schema.names]
            # Integer sample ids are usually consecutive: delta encoding stores them in almost
            # nothing, and writes them in half the time of plain + snappy (4M ids: 16 MB, 0.11 s
            # against 0 MB, 0.05 s).
            ids = self.schema.field("sample_id").type if "sample_id" in self.schema.names else None
            encoding = {"sample_id": "DELTA_BINARY_PACKED"} if ids is not None and pa.types.is_integer(ids) else None
            self._writer = pq.ParquetWriter(str(tmp), self.schema, use_dictionary=labels, column_encoding=encoding)
            self._tmp = Path(tmp)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _final_metadata(self, writer: pq.ParquetWriter) -> pa.Schema | None:
        """Put the late entries into the footer's metadata; the schema the file must read back as."""
        if not self._late:
            return None
        final = _with_metadata(self.schema, {**self._metadata, **self._late})
        # What pyarrow's writer stores at open (parquet/arrow/writer.cc, GetSchemaMetadata): the
        # schema's own entries, and the schema IPC-serialised under ARROW:schema, in base64.
        entries = {key.decode(): value.decode() for key, value in (final.metadata or {}).items()}
        entries["ARROW:schema"] = base64.b64encode(final.serialize().to_pybytes()).decode()
        writer.add_key_value_metadata(entries)
        return final

    def _check_metadata(self, final: pa.Schema) -> None:
        """Refuse the file unless it reads back with ``final``'s metadata (a pyarrow change would)."""
        written = pq.read_schema(str(self._tmp))
        if (written.metadata or {}).get(_META_KEY) != final.metadata[_META_KEY]:
            raise RuntimeError(
                f"pyarrow {pa.__version__} did not record the selections metadata given at the close of "
                f"{str(self.path)!r}; the file was not written."
            )

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one record batch (of :func:`iter_selections`) as a row group."""
        if self._writer is None:
            raise RuntimeError("SelectionsWriter.write() outside its 'with' block.")
        if not batch.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"The batch's schema must be the file's ({self.schema.names}). Got {batch.schema.names}.")
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def write_all(self, batches: Iterable[Any], prepare: Callable[[Any], pa.RecordBatch] | None = None) -> int:
        """Append every batch of ``batches``, writing each in a second thread while the next is made.

        Parquet's encoding and compression release the GIL, so writing one chunk's selections
        overlaps scoring the next (:func:`iter_selections`). At most one finished batch waits
        for the writer: memory grows by one chunk's selections, not with the batch. The first
        error on either side stops both and is raised here, after the writer thread has ended.

        Parameters
        ----------
        batches : iterable
            Record batches, or items that ``prepare`` turns into record batches.
        prepare : callable, optional
            Called on each item in the writer thread, in order (see
            :func:`write_selections_stream`).

        Returns
        -------
        int
            The rows written so far (:attr:`rows`).
        """
        pending: queue.Queue[Any] = queue.Queue(maxsize=1)
        failed: list[BaseException] = []

        def drain() -> None:
            while (batch := pending.get()) is not None:
                if failed:
                    continue  # keep taking batches so that the producer never blocks
                try:
                    self.write(batch if prepare is None else prepare(batch))
                except BaseException as exc:  # raised in the caller's thread below
                    failed.append(exc)

        writer = threading.Thread(target=drain, name="seapig-selections-writer", daemon=True)
        writer.start()
        try:
            for batch in batches:
                if failed:
                    break
                pending.put(batch)
        finally:
            pending.put(None)
            writer.join()
        if failed:
            raise failed[0]
        return self.rows

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, writer = self._stack, self._writer
        self._stack = self._writer = None
        if stack is None:
            return
        with stack:  # commits the temporary file, or removes it on an exception
            if writer is not None:
                try:
                    final = self._final_metadata(writer) if exc_type is None else None
                    writer.close()
                    if final is not None:
                        self._check_metadata(final)
                except BaseException:
                    if exc_type is None:
                        raise
            if exc_type is not None:
                stack.pop_all().__exit__(exc_type, exc, tb)


def iter_selections(
    bundle: SelectorBundle,
    source: Any,
    *,
    start: int = 0,
    stop: int | None = None,
    chunk_rows: int | None = None,
    summary: SelectionSummary | None = None,
    seen: Any = None,
) -> Iterator[pa.RecordBatch]:
    """Stream a logit file through a bundle: one selections record batch per chunk, in input order.

    Each chunk (:meth:`seapig_core.sources.LogitsSource.iter_chunks`: validated, sample ids
    checked for repeats, probabilities converted) is validated for the bundle once
    (:meth:`~seapig_core.bundle.SelectorBundle.check_query`) and scored in one pass
    (:func:`seapig_core.kernels.score_pass`: every score, the prediction, the runner-up and the
    certainty ratio). The file's header is checked against the bundle before any data is read.

    Parameters
    ----------
    bundle : SelectorBundle
    source : LogitsSource
        From :func:`seapig_core.sources.open_logits_file`.
    start, stop : int, optional
        A row range (default every row): :func:`seapig_core.pipeline.score_rows` scores row
        ranges apart and merges them.
    chunk_rows : int, optional
        Rows per chunk (default :data:`seapig_core.sources.DEFAULT_CHUNK_ROWS`): memory
        follows it.
    summary : SelectionSummary, optional
        Updated with every chunk.
    seen : SampleIdSet, optional
        Sample ids seen elsewhere (other row ranges), checked for repeats.

    Yields
    ------
    pyarrow.RecordBatch
        With :func:`selections_schema` of the source's id kind and dtype.
    """
    schema = selections_schema(bundle, source.id_kind, source.dtype)
    for scored in _scored_chunks(bundle, source, start=start, stop=stop, chunk_rows=chunk_rows, seen=seen):
        yield _summarised_batch(scored, schema, summary)


def _summarised_batch(
    scored: tuple[dict[str, np.ndarray], int], schema: pa.Schema, summary: SelectionSummary | None
) -> pa.RecordBatch:
    """One scored chunk (columns, first row) added to ``summary`` and made a record batch."""
    columns, offset = scored
    if summary is not None:
        summary.update(columns, offset)
    return _record_batch(columns, schema)


def _scored_chunks(
    bundle: SelectorBundle, source: Any, *, start: int, stop: int | None, chunk_rows: int | None, seen: Any
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Each chunk's selections columns and first row (:func:`iter_selections` before Arrow)."""
    from seapig_core.sources import DEFAULT_CHUNK_ROWS

    chunk_rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else check_positive_int(chunk_rows, "chunk_rows")
    check_source_fits(bundle, source)
    name = source.name
    for chunk in source.iter_chunks(
        chunk_rows, start=start, stop=stop, labels=False, task=bundle.task, per_member=bundle.per_member, seen=seen
    ):
        yield _score_chunk(bundle, chunk.logits, chunk.sample_ids, name), chunk.start


def write_selections_stream(
    writer: SelectionsWriter,
    bundle: SelectorBundle,
    source: Any,
    *,
    chunk_rows: int | None = None,
    summary: SelectionSummary | None = None,
) -> int:
    """Score a logit file into an open :class:`SelectionsWriter`: :func:`iter_selections`, pipelined.

    This thread reads and scores chunk after chunk; a second thread turns each scored chunk
    into its record batch, adds it to ``summary`` and writes it (:meth:`SelectionsWriter.write_all`),
    so the bookkeeping and the Parquet write of one chunk overlap the scoring of the next. The
    file, the summary and the errors are those of writing every batch of :func:`iter_selections`.

    Returns
    -------
    int
        The rows written.
    """
    schema = selections_schema(bundle, source.id_kind, source.dtype)
    scored = _scored_chunks(bundle, source, start=0, stop=None, chunk_rows=chunk_rows, seen=None)
    return writer.write_all(scored, lambda item: _summarised_batch(item, schema, summary))


def check_source_fits(bundle: SelectorBundle, source: Any) -> None:
    """Check a logit file's header against the bundle (layout, class count) before reading data.

    Raises
    ------
    ValueError
        Naming the file, as :meth:`~seapig_core.bundle.SelectorBundle.check_query`.
    """
    if source.trailing_shape is None:
        return  # a list column of unknown width: checked on the first chunk
    dtype = torch.float64 if _float_dtype(source.dtype) == np.float64 else torch.float32
    try:
        bundle.check_query(torch.empty((0, *source.trailing_shape), dtype=dtype), source.name)
    except ValueError as exc:
        raise ValueError(f"The '{source.name}' file {str(source.path)!r} does not fit the bundle: {exc}") from None


# ----------------------------------------------------------------------------- summary


class _CalibrationReference:
    """What a batch's summary compares with: a bundle's finite calibration scores, prepared once."""

    def __init__(self, bundle: SelectorBundle) -> None:
        from seapig_core.drift import psi_bin_edges

        scores = _numpy(bundle.primary.scores).astype(np.float64)  # type: ignore[arg-type]
        self.scores = scores[np.isfinite(scores)]
        self.size = int(self.scores.size)
        self.threshold = float(bundle.threshold)
        self.expected_rejection_rate = float(bundle.expected_rejection_rate)
        self.values, counts = np.unique(self.scores, return_counts=True)
        self.cumulative = np.cumsum(counts)  # calibration scores <= each distinct value
        self.rejected = int(self.size - np.count_nonzero(self.scores < self.threshold))
        self.mean = float(self.scores.mean()) if self.size else math.nan
        self.edges = psi_bin_edges(self.scores) if self.size else np.empty(0)
        self.psi_counts = np.bincount(np.searchsorted(self.edges, self.scores, side="right"), minlength=self.edges.size + 1)


_REFERENCES: dict[int, tuple[weakref.ref, _CalibrationReference]] = {}


def _reference(bundle: SelectorBundle) -> _CalibrationReference:
    """The calibration reference of ``bundle``, computed once per loaded bundle object."""
    key = id(bundle)
    found = _REFERENCES.get(key)
    if found is not None and found[0]() is bundle:
        return found[1]
    reference = _CalibrationReference(bundle)
    _REFERENCES[key] = (weakref.ref(bundle, lambda _, key=key: _REFERENCES.pop(key, None)), reference)
    return reference


_QUEUE_FIELDS = ("sample_id", "prediction", "score", "selected", "alternate_label", "certainty_ratio")


class SelectionSummary:
    """The summary of a batch, accumulated chunk by chunk in bounded memory, and mergeable.

    :meth:`update` takes each chunk's selections columns; :meth:`merge` adds the summary of
    the following row range (scored elsewhere, e.g. on a Dask worker; merge in input order);
    :meth:`result` gives exactly the dict of :func:`summarize_selections` and
    :meth:`review_queue` the review queue (:func:`seapig_core.review.review_queue`) of the
    whole batch. What is kept, whatever the batch's size:

    - counts: samples, selected, rejected, finite;
    - the finite scores while there are at most :data:`EXACT_SUMMARY_SAMPLES` (80 kB): the
      KS test, the PSI and the mean are then computed from them exactly as
      :func:`seapig_core.drift.drift_statistics` computes them;
    - for larger batches, the count of scores equal to and between the calibration's distinct
      values (two int64 arrays of the calibration's size) and per PSI bin. They give the
      KS statistic exactly (the largest gap between the two empirical CDFs is reached at a
      calibration value or at the largest query score below one), its p-value by the same
      asymptotic formula scipy's ``ks_2samp`` uses beyond 10,000 samples, and the PSI
      exactly; the mean score is the sum of the per-chunk sums (equal to within float64
      rounding; identical for the same chunking);
    - the ``queue_rows`` rejected samples a reviewer should see first.

    Parameters
    ----------
    bundle : SelectorBundle
        The selector the batch is scored with (its calibration scores are the reference).
    queue_rows : int, default 20
        Rows of the review queue kept.
    """

    def __init__(self, bundle: SelectorBundle, queue_rows: int = 20) -> None:
        if not isinstance(bundle, SelectorBundle):
            raise TypeError(f"The 'bundle' parameter must be a SelectorBundle. Got {type(bundle).__name__} instead.")
        self.bundle: SelectorBundle | None = bundle
        self.bundle_key = bundle.manifest_sha256 or f"unsaved-{id(bundle)}"
        self.queue_rows = check_positive_int(queue_rows, "queue_rows")
        self._ref: _CalibrationReference | None = _reference(bundle)
        self.samples = self.selected = self.rejected = self.finite = 0
        self._sums: list[float] = []
        self._kept: list[np.ndarray] | None = []
        self._equal = np.zeros(self._ref.values.size, dtype=np.int64)
        self._between = np.zeros(self._ref.values.size + 1, dtype=np.int64)
        self._psi = np.zeros(self._ref.edges.size + 1, dtype=np.int64)
        self._queue: dict[str, Any] | None = None  # the best rejected rows so far, with "_position"

    def __getstate__(self) -> dict[str, Any]:
        # Shipped between processes (a Dask worker's partial summary) without the bundle and
        # the calibration reference: the receiving side merges it into a summary that has them.
        state = dict(self.__dict__)
        state["bundle"] = state["_ref"] = None
        return state

    # -- accumulating

    def update(self, columns: Mapping[str, Any], start: int = 0) -> None:
        """Add one chunk: selections columns (``score``, ``selected`` and, for the queue, the rest)."""
        score = np.asarray(columns["score"], dtype=np.float64)
        selected = np.asarray(columns["selected"], dtype=bool)
        finite = np.isfinite(score)
        values = score[finite]
        self.samples += int(score.size)
        self.selected += int(np.count_nonzero(selected))
        self.rejected += int(np.count_nonzero(~selected | ~finite))
        self.finite += int(values.size)
        if values.size:
            self._sums.append(float(values.sum()))
        if self._kept is not None:
            self._kept.append(values)
            if self.finite > EXACT_SUMMARY_SAMPLES:
                self._kept = None
        ref = self._reference()
        if values.size and ref.size:
            ordered = np.sort(values)
            if ref.values.size < ordered.size:  # search the fewer values among the more
                below = np.searchsorted(ordered, ref.values, side="left")  # query scores < each calibration value
                # Query scores <= each calibration value: the same, except where some equal it
                # (rare for continuous scores), searched again only there.
                at_or_below = below
                hit = ordered[np.minimum(below, ordered.size - 1)] == ref.values
                if hit.any():
                    at_or_below = below.copy()
                    at_or_below[hit] = np.searchsorted(ordered, ref.values[hit], side="right")
                    self._equal += at_or_below - below
                self._between[:-1] += below
                self._between[-1] += ordered.size
                self._between[1:] -= at_or_below  # in (c_{j-1}, c_j)
            else:
                low = np.searchsorted(ref.values, ordered, side="left")
                equal = ref.values[np.minimum(low, ref.values.size - 1)] == ordered  # at a calibration value
                self._equal += np.bincount(low[equal], minlength=ref.values.size)
                self._between += np.bincount(low[~equal], minlength=ref.values.size + 1)
            # PSI bin b holds edges[b - 1] <= x < edges[b]
            self._psi += np.diff(np.r_[0, np.searchsorted(ordered, ref.edges, side="left"), ordered.size])
        rejected = ~selected | ~finite
        if rejected.any():
            self._offer(columns, np.flatnonzero(rejected), start, score[rejected])

    def _offer(self, columns: Mapping[str, Any], rows: np.ndarray, start: int, scores: np.ndarray) -> None:
        if rows.size > self.queue_rows:
            # Only rows that can make the queue: the first non-finite ones (input order), and the
            # highest scores down to the queue_rows-th, ties included (the ratio and the position
            # break them later).
            non_finite = ~np.isfinite(scores)
            keep = np.flatnonzero(non_finite)[: self.queue_rows]
            finite = np.flatnonzero(~non_finite)
            room = self.queue_rows - keep.size
            if room > 0 and finite.size:
                values = scores[finite]
                if finite.size > room:
                    cut = np.partition(values, finite.size - room)[finite.size - room]
                    finite = finite[values >= cut]
                keep = np.concatenate([keep, finite])
            rows = rows[np.sort(keep)]
        candidate = {name: np.asarray(columns[name])[rows] if name in columns else np.full(rows.size, np.nan)
                     for name in _QUEUE_FIELDS}
        candidate["_position"] = rows.astype(np.int64) + start
        self._queue = self._best(candidate if self._queue is None else _concat(self._queue, candidate))

    def _best(self, rows: dict[str, Any]) -> dict[str, Any]:
        """The ``queue_rows`` rows first in review order (:mod:`seapig_core.review`), by position."""
        score = np.asarray(rows["score"], dtype=np.float64)
        ratio = np.asarray(rows["certainty_ratio"], dtype=np.float64)
        non_finite = ~np.isfinite(score)
        order = np.lexsort((
            rows["_position"],
            np.where(np.isnan(ratio), np.inf, -ratio),
            np.where(non_finite, 0.0, -np.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)),
            ~non_finite,
        ))[: self.queue_rows]
        order = order[np.argsort(rows["_position"][order], kind="stable")]
        return {name: value[order] for name, value in rows.items()}

    def merge(self, other: SelectionSummary) -> SelectionSummary:
        """Add the summary of the rows that follow (same bundle); returns ``self``.

        Raises
        ------
        ValueError
            If ``other`` was made with another bundle version.
        """
        if not isinstance(other, SelectionSummary):
            raise TypeError(f"The 'other' parameter must be a SelectionSummary. Got {type(other).__name__} instead.")
        if other.bundle_key != self.bundle_key:
            raise ValueError(
                f"Only summaries of the same bundle version can be merged. Got {other.bundle_key!r} and {self.bundle_key!r}."
            )
        self.samples += other.samples
        self.selected += other.selected
        self.rejected += other.rejected
        self.finite += other.finite
        self._sums += other._sums
        if self._kept is not None and other._kept is not None and self.finite <= EXACT_SUMMARY_SAMPLES:
            self._kept = self._kept + other._kept
        else:
            self._kept = None
        self._equal += other._equal
        self._between += other._between
        self._psi += other._psi
        if other._queue is not None:
            self._queue = self._best(other._queue if self._queue is None else _concat(self._queue, other._queue))
        return self

    # -- results

    def _reference(self) -> _CalibrationReference:
        if self._ref is None:
            raise ValueError("This summary came from another process without its bundle: merge it first (merge_summaries(parts, bundle)).")
        return self._ref

    def _ks(self) -> tuple[float, float]:
        """KS statistic and p-value of the finite scores against the calibration (scipy's ``ks_2samp``)."""
        from scipy import stats

        ref = self._reference()
        if self._kept is not None:
            result = stats.ks_2samp(np.concatenate(self._kept), ref.scores)
            return float(result.statistic), float(result.pvalue)
        n1, n2 = self.finite, ref.size
        below_or_at = np.cumsum(self._between[:-1] + self._equal)  # query scores <= each calibration value
        below = below_or_at - self._equal  # query scores < each calibration value
        at_values = below_or_at / n1 - ref.cumulative / n2
        # the largest query score strictly between two calibration values (or above the last)
        occupied = self._between > 0
        top = np.r_[below, n1][occupied] / n1 - np.r_[0, ref.cumulative][occupied] / n2
        max_gap = max(float(at_values.max()), float(top.max()) if top.size else -np.inf)
        min_gap = float(np.clip(-at_values.min(), 0, 1))
        d = min_gap if min_gap > max_gap else max_gap
        m, n = sorted([float(n1), float(n2)], reverse=True)
        pvalue = float(np.clip(stats.kstwo.sf(d, np.round(m * n / (m + n))), 0, 1))
        return float(np.float64(d)), pvalue

    def result(self, thresholds: Any = None) -> dict[str, Any]:
        """The batch's summary: the dict of :func:`summarize_selections` (see there).

        Raises
        ------
        ValueError
            If the bundle has no finite calibration score.
        """
        from seapig_core.drift import check_drift_thresholds, drift_verdict, psi_from_counts

        limits = check_drift_thresholds(thresholds)
        ref = self._reference()
        if ref.size == 0:
            raise ValueError("The 'calibration_scores' parameter must hold at least one finite score. Got none.")
        ks_stat = ks_p = psi = None
        mean = None
        if self.finite:
            ks_stat, ks_p = self._ks()
            psi = psi_from_counts(self._psi, ref.psi_counts)
            mean = float(np.concatenate(self._kept).mean()) if self._kept is not None else math.fsum(self._sums) / self.finite
        drift = drift_verdict(
            samples=self.samples, rejected=self.rejected, finite=self.finite, ks_statistic=ks_stat, ks_pvalue=ks_p,
            psi=psi, calibration_samples=ref.size, calibration_rejected=ref.rejected,
            expected_rejection_rate=ref.expected_rejection_rate, thresholds=limits,
        )
        summary: dict[str, Any] = {
            "samples": self.samples,
            "selected": self.selected,
            "rejected": drift["rejected"],
            "rejection_rate": drift["rejection_rate"],
            "expected_rejection_rate": drift["expected_rejection_rate"],
            "non_finite": drift["non_finite"],
            "mean_score": mean,
            "calibration_mean_score": ref.mean,
        }
        summary.update({k: v for k, v in drift.items() if k not in summary})
        return summary

    def review_queue(self, n: int | None = None, class_names: Any = None) -> pd.DataFrame:
        """The review queue of the whole batch (:func:`seapig_core.review.review_queue`), from the kept rows.

        ``n`` (at most ``queue_rows``, the default) rows; ``class_names`` default the bundle's.
        """
        from seapig_core.review import review_queue

        n = self.queue_rows if n is None else min(check_positive_int(n, "n"), self.queue_rows)
        names = class_names if class_names is not None else (None if self.bundle is None else self.bundle.class_names)
        rows = self._queue or {name: np.empty(0) for name in _QUEUE_FIELDS}
        table = _frame({name: rows[name] for name in _QUEUE_FIELDS})
        return review_queue(table, n=n, class_names=names)

    def review_records(self, n: int | None = None) -> list[dict[str, Any]]:
        """:meth:`review_queue` as JSON-serialisable rows (NaN as None, vectors as lists)."""
        return [{key: _plain(value) for key, value in row.items()} for row in self.review_queue(n).to_dict("records")]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _concat(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return {name: np.concatenate([a[name], b[name]]) for name in a}


def merge_summaries(parts: Any, bundle: SelectorBundle | None = None) -> SelectionSummary:
    """One summary of consecutive row ranges, from their :class:`SelectionSummary` in input order.

    Parameters
    ----------
    parts : iterable of SelectionSummary
        In input order (e.g. the partial summaries of :func:`seapig_core.pipeline.score_rows`).
    bundle : SelectorBundle, optional
        The bundle they were scored with; needed when the parts came from other processes
        (a pickled summary does not carry its bundle).

    Raises
    ------
    ValueError
        For no parts, parts of different bundle versions, or no bundle for unpickled parts.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("The 'parts' parameter must hold at least one SelectionSummary. Got none.")
    bundle = bundle if bundle is not None else parts[0].bundle
    if bundle is None:
        raise ValueError("The 'bundle' parameter is needed to merge summaries that came from other processes. Got None.")
    merged = SelectionSummary(bundle, parts[0].queue_rows)
    for part in parts:
        merged.merge(part)
    return merged


def selections_path(output_dir: str | os.PathLike[str], batch: str) -> Path:
    """``<output_dir>/<batch>.selections.parquet``; ``batch`` must be a plain file-name stem."""
    return Path(output_dir) / f"{check_file_stem(batch, 'batch')}{SELECTIONS_SUFFIX}"


def write_selections(
    table: pd.DataFrame, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a selections table to Parquet atomically, replacing an earlier file at ``path``.

    The directory is created if needed. If anything fails, ``path`` keeps its previous content
    (or stays absent) and no temporary file is left behind.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`selections_table`.
    path : str or Path
        Destination, e.g. :func:`selections_path`.
    metadata : dict, optional
        JSON-serialisable entries added to the file's ``seapig_core`` metadata.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        If required columns are missing or the directory cannot be written.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame. Got {type(table).__name__} instead.")
    missing = [c for c in ("sample_id", "prediction", "score", "selected") if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter must have the columns {missing}. Got {list(table.columns)} instead.")
    path = Path(path)
    ensure_writable_dir(path.parent, "output_dir")
    meta = {
        "format": SELECTIONS_FORMAT,
        "schema_version": SELECTIONS_SCHEMA_VERSION,
        "library_version": __version__,
        **(metadata or {}),
    }
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    schema_meta = dict(arrow.schema.metadata or {})
    schema_meta[_META_KEY] = json.dumps(meta, sort_keys=True, allow_nan=False, default=str).encode()
    arrow = arrow.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)
    return path


def read_selections(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a selections file; its ``seapig_core`` metadata is in ``DataFrame.attrs["seapig_core"]``.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a selections file or of another schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The 'path' parameter must name an existing selections file. Got {str(path)!r} instead.")
    try:
        arrow = pq.read_table(path)
        raw = (arrow.schema.metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {exc}") from exc
    problem = header_problem(meta, SELECTIONS_FORMAT, SELECTIONS_SCHEMA_VERSION)
    if problem is not None:
        raise ValueError(f"{str(path)!r} is not a seapig_core selections file this version can read: {problem}.")
    table = arrow.to_pandas()
    table.attrs["seapig_core"] = meta
    return table


def summarize_selections(bundle: SelectorBundle, table: pd.DataFrame, thresholds: Any = None) -> dict[str, Any]:
    """Numbers a reviewer compares with the calibration for one selections table, and a drift verdict.

    Parameters
    ----------
    bundle : SelectorBundle
        The selector the table was scored with.
    table : pandas.DataFrame
        A selections table (:func:`selections_table` or :func:`read_selections`); may be empty.
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds (:class:`seapig_core.drift.DriftThresholds`); the
        defaults when omitted.

    Returns
    -------
    dict
        JSON-serialisable: ``samples``, ``selected``, ``rejected``, ``rejection_rate``,
        ``expected_rejection_rate`` (the share of calibration samples the threshold rejects,
        about ``1 - q`` for a quantile threshold), ``non_finite`` (samples with non-finite
        logits), ``mean_score`` and ``calibration_mean_score``, and the drift statistics of
        :func:`seapig_core.drift.drift_statistics`: ``binomial_pvalue``, ``rate_pvalue``,
        ``calibration_samples``, ``ks_statistic``, ``ks_pvalue``, ``psi`` (the last three None
        without finite query scores), ``verdict`` (``"ok"``, ``"drift"``, ``"insufficient"``),
        ``reasons`` (sentences) and ``thresholds`` (as a dict). An empty table gives
        ``samples`` 0, verdict ``"insufficient"`` and None for the rates and statistics.

    Raises
    ------
    ValueError
        For a table without ``score``/``selected``.

    Notes
    -----
    The counts come from the table's ``selected`` column (the decisions that were written),
    the distribution statistics from its ``score`` column. The same numbers as a
    :class:`SelectionSummary` streamed over the batch (what
    :func:`seapig_core.pipeline.score_file` returns).
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"The 'table' parameter must be a pandas DataFrame. Got {type(table).__name__} instead.")
    missing = [c for c in ("score", "selected") if c not in table.columns]
    if missing:
        raise ValueError(f"The 'table' parameter must have the columns {missing}. Got {list(table.columns)} instead.")
    summary = SelectionSummary(bundle)
    summary.update({"score": table["score"].to_numpy(dtype=np.float64), "selected": table["selected"].to_numpy(dtype=bool)})
    return summary.result(thresholds)
