"""The pipeline's steps as plain functions: files in, files and small JSON summaries out.

Each function is one step of the calibration or scoring flow; the repository's ``tasks/``
wrap each in a Prefect task, and they work just as well from a notebook or a cron job. They
take and return paths and JSON-serialisable summaries (never large tensors), so that what
passes between Prefect tasks stays small.

- :func:`calibrate_file`: calibration logits file -> selector bundle directory;
- :func:`score_file`: bundle + query logits file -> ``<batch>.selections.parquet``, streamed;
- :func:`score_rows` / :func:`merge_rows`: the same for row ranges of one file scored apart
  (e.g. on Dask workers) and merged into one selections file in input order
  (:mod:`seapig_core.scaleout` stages the ranges in part files, for a Dask cluster);
- :func:`calibration_review` / :func:`scoring_review`: bundle (+ selections) -> :class:`~seapig_core.reports.Report`;
- :func:`content_fingerprint`: the content hash of a step's input or output, for cache keys.
- :func:`input_fingerprint`: what a selections file records of its input (SHA-256 when known, else xxh3-128).

Extraction from a model and a data source is :func:`seapig_core.sources.extract_from_factories`.

Memory
------
:func:`score_file` streams: the query file is read in chunks of ``chunk_rows`` rows
(:meth:`seapig_core.sources.LogitsSource.iter_chunks`), each chunk is validated once and scored
in one pass (:func:`seapig_core.selections.iter_selections`), written as one row group of the
selections file (:class:`seapig_core.selections.SelectionsWriter`) and added to the summary and
the review queue (:class:`seapig_core.selections.SelectionSummary`), then dropped. Peak memory
beyond the interpreter's baseline follows ``chunk_rows``, not the batch's size (see
``benchmarks/bench_pipeline.py``; memory-mapped pages of the input count as the page cache, not
as the process's anonymous memory). Calls running at once in one process (the scoring flow's
concurrent batch tasks) share a **memory budget** (:class:`MemoryBudget`): each reserves its
working set (:func:`scoring_working_set`) before streaming and waits while the others hold the
rest; a call whose working set alone exceeds the budget scores smaller chunks. The budget is
``memory_budget_mb`` (calls passing the same value share one budget), by default
``$SEAPIG_MEMORY_BUDGET_MB`` or :data:`DEFAULT_MEMORY_BUDGET_MB`. It bounds the batches' working
sets; the loaded bundles (cached once per process) and the interpreter come on top.

Calibration reads its file whole (:func:`seapig_core.sources.read_logits_file`, into one
preallocated tensor): the temperature fit, the thresholds and the metrics use every sample, and
the bundle stores the calibration scores and logits anyway, so its memory is the calibration
set's size (once, not the 3.5x of a whole-table Parquet read), not the query batches'.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from seapig_core import store
from seapig_core._io import file_sha256, file_xxh3_128
from seapig_core._validation import check_positive_int
from seapig_core._version import __version__
from seapig_core.bundle import (
    DEFAULT_KEEP_PREVIOUS,
    CalibrationSettings,
    SelectorBundle,
    fit_selector,
    load_bundle,
    load_bundle_cached,
    resolve_settings,
)
from seapig_core.drift import check_drift_thresholds
from seapig_core.reports import Report, calibration_report, scoring_report
from seapig_core.selections import (
    SelectionSummary,
    SelectionsWriter,
    check_source_fits,
    iter_selections,
    merge_summaries,
    read_selections,
    selections_path,
    selections_schema,
    write_selections_stream,
)
from seapig_core.sources import DEFAULT_CHUNK_ROWS, LogitsSource, SampleIdSet, open_logits_file, read_logits_file

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "MEMORY_BUDGET_ENV",
    "MemoryBudget",
    "ScoredRows",
    "calibrate_file",
    "calibration_review",
    "content_fingerprint",
    "input_fingerprint",
    "memory_budget",
    "merge_rows",
    "row_ranges",
    "score_file",
    "score_rows",
    "scoring_review",
    "scoring_working_set",
]


def content_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 identifying the content at ``path``; None if nothing (valid) is there.

    A selector bundle directory is identified by the manifest SHA-256 of its current version
    (which names every score file by its hash, and differs between any two versions); it is
    loaded and verified first (:func:`seapig_core.bundle.load_bundle`), and a bundle that does
    not load has no fingerprint (None), so that it is never served from a cache. A logits
    store entry is identified by its manifest (which holds the data file's hash), and any
    other file by its bytes.
    """
    path = Path(path)
    if path.is_dir():
        try:
            return load_bundle(path, include_logits=False).manifest_sha256
        except ValueError:
            return None
    if not path.is_file():
        return None
    if store.is_entry(path):
        manifest = store.entry_paths(path.parent, store.entry_prefix(path))[1]
        if manifest.is_file():
            return file_sha256(manifest)
    return file_sha256(path)


def _reusable_bundle(bundle_dir: str | os.PathLike[str], settings: CalibrationSettings, logits_sha256: str | None) -> SelectorBundle | None:
    """The current version of ``bundle_dir`` if it can stand for this calibration, else None.

    Only a bundle that loads cleanly (every hash and field verified) and was calibrated from
    the same input content, with the same settings and this library version, is reused.
    """
    if logits_sha256 is None:
        return None
    try:
        current = load_bundle(bundle_dir, include_logits=False)
    except ValueError:
        return None  # absent, of another schema version, or damaged: refit, which repairs it
    same = (
        current.settings == settings
        and current.library_version == __version__
        and current.source.get("logits_sha256") == logits_sha256
    )
    return current if same else None


def calibrate_file(
    logits_path: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    settings: CalibrationSettings | Mapping[str, Any] | None = None,
    *,
    keep_previous: int = DEFAULT_KEEP_PREVIOUS,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fit a selector on a calibration logits file and save it as a new version of a bundle.

    If the bundle's current version loads cleanly and was calibrated from the same content
    (the file's :func:`content_fingerprint`) with the same ``settings`` and the same library
    version, it is reused: nothing is refitted or written (``reused`` is True). Otherwise
    ``logits_path`` is read whole (:func:`seapig_core.sources.read_logits_file`: into one
    preallocated tensor; a file of probabilities is converted with the settings' ``task``; a
    file without samples is refused, naming it), a selector is fitted
    (:func:`seapig_core.bundle.fit_selector`) and saved as a new version
    (:meth:`~seapig_core.bundle.SelectorBundle.save`); a damaged bundle is repaired that way.

    Parameters
    ----------
    logits_path : str or os.PathLike
        Calibration logits (with labels for a temperature, metrics or a target risk).
    bundle_dir : str or os.PathLike
        The bundle root.
    settings : CalibrationSettings or dict, optional
        The calibration settings; or give them as keyword arguments (``scores=..., q=...``).
    keep_previous : int, default :data:`seapig_core.bundle.DEFAULT_KEEP_PREVIOUS`
        Old versions kept besides the current one.

    Returns
    -------
    dict
        ``bundle_dir``, ``version``, ``version_path``, ``manifest_sha256``, ``primary``,
        ``threshold``, ``temperature``, the bundle's ``calibration`` summary and ``reused``.
    """
    settings = resolve_settings(settings, kwargs)
    logits_sha256 = content_fingerprint(logits_path)
    bundle = _reusable_bundle(bundle_dir, settings, logits_sha256)
    reused = bundle is not None
    if bundle is None:
        data = read_logits_file(logits_path, task=settings.task, per_member=settings.per_member)
        source = {"logits_path": str(Path(logits_path).resolve()), "logits_sha256": logits_sha256}
        bundle = fit_selector(data.logits, data.labels, settings, source=source)
        bundle.save(bundle_dir, keep_previous=keep_previous)
    return {
        "bundle_dir": str(bundle.path),
        "version": bundle.version,
        "version_path": str(bundle.version_path),
        "manifest_sha256": bundle.manifest_sha256,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        "calibration": bundle.calibration,
        "reused": reused,
    }


# ----------------------------------------------------------------------------- memory budget

#: Environment variable: the default memory budget of concurrent scoring in one process, in MB.
MEMORY_BUDGET_ENV = "SEAPIG_MEMORY_BUDGET_MB"
#: The default memory budget (MB) when :data:`MEMORY_BUDGET_ENV` is not set.
DEFAULT_MEMORY_BUDGET_MB = 1024
_MIN_CHUNK_ROWS = 1024
_FIXED_BYTES = 24 << 20  # kernel workspaces, Parquet reader/writer buffers, one row group's pages


class MemoryBudget:
    """A weighted semaphore over bytes: what scoring calls running at once in one process may hold.

    Each :func:`score_file` reserves its working set (:func:`scoring_working_set`) for as long
    as it streams, and waits while the calls already running hold the rest. A request larger
    than the whole budget is clipped to it (the call then runs alone).

    Parameters
    ----------
    limit_bytes : int
        The budget.

    Attributes
    ----------
    in_use : int
        Bytes reserved now.
    peak : int
        The most bytes ever reserved at once.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = check_positive_int(limit_bytes, "limit_bytes")
        self.in_use = 0
        self.peak = 0
        self._condition = threading.Condition()

    def __repr__(self) -> str:
        return f"MemoryBudget(limit={self.limit / 2**20:.0f} MB, in_use={self.in_use / 2**20:.0f} MB)"

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        """Hold ``nbytes`` (clipped to the limit) for the ``with`` block; yields what was reserved."""
        nbytes = min(max(int(nbytes), 0), self.limit)
        with self._condition:
            self._condition.wait_for(lambda: self.in_use + nbytes <= self.limit)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield nbytes
        finally:
            with self._condition:
                self.in_use -= nbytes
                self._condition.notify_all()


_BUDGETS: dict[int, MemoryBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def memory_budget(limit_mb: int | None = None) -> MemoryBudget:
    """The process-wide :class:`MemoryBudget` of ``limit_mb`` megabytes (shared by every caller of that size).

    Parameters
    ----------
    limit_mb : int, optional
        Default ``$SEAPIG_MEMORY_BUDGET_MB``, else :data:`DEFAULT_MEMORY_BUDGET_MB`.

    Raises
    ------
    ValueError
        If the size (or the environment variable) is not a positive integer.
    """
    if limit_mb is None:
        raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
        if raw:
            try:
                limit_mb = int(raw)
            except ValueError:
                raise ValueError(f"The {MEMORY_BUDGET_ENV} environment variable must be a positive integer (MB). Got {raw!r}.") from None
        else:
            limit_mb = DEFAULT_MEMORY_BUDGET_MB
    limit_mb = check_positive_int(limit_mb, "memory_budget_mb")
    with _BUDGETS_LOCK:
        if limit_mb not in _BUDGETS:
            _BUDGETS[limit_mb] = MemoryBudget(limit_mb << 20)
        return _BUDGETS[limit_mb]


def scoring_working_set(bundle: SelectorBundle, source: LogitsSource, chunk_rows: int) -> int:
    """Bytes that scoring ``source`` with ``bundle`` holds at once, chunk by chunk (an estimate from above).

    Per row of a chunk: the reader's copies of the values (none for mapped ``.npy``, stored
    ``.npz``, uncompressed Arrow IPC and store entries; one for compressed or converted input;
    about four for Parquet's decoding), the pass's outputs (every score, prediction, runner-up,
    certainty ratio), the Arrow record batch and Parquet page they become, the summary's
    per-chunk work; plus a fixed part (kernel workspaces, reader and writer buffers). Measured
    against the process's anonymous memory in ``benchmarks/bench_pipeline.py``.
    """
    itemsize = 8 if source.dtype == np.float64 else 4
    prediction = 8 * (bundle.n_units if bundle.task == "multilabel" else 1)
    outputs = len(bundle.scores) * (itemsize + 1) + prediction + 8 + itemsize + 1
    per_row = 4 * outputs + 64  # pass outputs, columns, Arrow and Parquet copies; summary (float64 copy, indices, masks)
    return int(source.chunk_bytes(chunk_rows) + chunk_rows * per_row + _FIXED_BYTES)


def _chunk_rows(bundle: SelectorBundle, source: LogitsSource, chunk_rows: int | None, budget: MemoryBudget) -> tuple[int, int]:
    """Rows per chunk and the working set to reserve: ``chunk_rows``, fewer if that alone exceeds the budget."""
    rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else check_positive_int(chunk_rows, "chunk_rows")
    need = scoring_working_set(bundle, source, rows)
    while need > budget.limit and rows > _MIN_CHUNK_ROWS:
        rows = max(_MIN_CHUNK_ROWS, rows // 2)
        need = scoring_working_set(bundle, source, rows)
    return rows, need


# ----------------------------------------------------------------------------- scoring


def _bundle(bundle: SelectorBundle | str | os.PathLike[str]) -> SelectorBundle:
    return bundle if isinstance(bundle, SelectorBundle) else load_bundle_cached(bundle)


def _provenance(bundle: SelectorBundle) -> dict[str, Any]:
    return {
        "bundle_version": bundle.version,
        "bundle_manifest_sha256": bundle.manifest_sha256,
        "bundle_dir": None if bundle.path is None else str(Path(bundle.path).resolve()),
    }


def input_fingerprint(
    logits_path: str | os.PathLike[str] | None, logits_sha256: str | None = None, *, source: LogitsSource | None = None
) -> dict[str, str | None]:
    """What a selections file records of its input's content: ``logits_sha256`` or ``logits_xxh3_128``.

    ``logits_sha256`` is the SHA-256 the caller already has (the scoring ledger hashes every
    file it claims, for exactly-once scoring) or, for a logits store entry, its manifest's
    (:func:`content_fingerprint`: the manifest names the data file's checksums). Otherwise it is
    None and ``logits_xxh3_128`` fingerprints the file's bytes (:func:`seapig_core._io.file_xxh3_128`):
    provenance needs no cryptographic hash, and a SHA-256 of the file alone would cost more than
    twice the scoring pass (1.2 s against 0.5 s for 4M x 100 float32 here). Given the open
    ``source`` that read the file with ``hash_while_reading=True``, the bytes it read were hashed
    as they were read (:meth:`seapig_core.sources.LogitsSource.xxh3_128`): no second read.

    Parameters
    ----------
    logits_path : str or os.PathLike, optional
        The query file (None: nothing is recorded unless ``logits_sha256`` is given).
    logits_sha256 : str, optional
        The file's SHA-256, when the caller has it.
    source : LogitsSource, optional
        ``logits_path`` opened, and read, with ``hash_while_reading=True``.

    Returns
    -------
    dict
        ``{"logits_sha256": ..., "logits_xxh3_128": ...}``, at most one of them not None.
    """
    if logits_sha256 is None and logits_path is not None:
        if store.is_entry(logits_path):
            logits_sha256 = content_fingerprint(logits_path)
        elif Path(logits_path).is_file():
            digest = file_xxh3_128(logits_path) if source is None else source.xxh3_128()
            return {"logits_sha256": None, "logits_xxh3_128": digest}
    return {"logits_sha256": logits_sha256, "logits_xxh3_128": None}


def _metadata(bundle: SelectorBundle, batch: str, fingerprint: Mapping[str, str | None]) -> dict[str, Any]:
    return {
        "batch": batch,
        "primary": bundle.primary_name,
        "threshold": bundle.threshold,
        "temperature": bundle.temperature,
        **_provenance(bundle),
        **fingerprint,
    }


def score_file(
    bundle_dir: str | os.PathLike[str],
    logits_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    batch: str,
    *,
    thresholds: Any = None,
    chunk_rows: int | None = None,
    memory_budget_mb: int | None = None,
    queue_rows: int = 20,
    logits_sha256: str | None = None,
    probabilities: bool | None = None,
) -> dict[str, Any]:
    """Score and select one query batch; write ``<output_dir>/<batch>.selections.parquet``, streamed.

    The bundle is loaded once per process (:func:`seapig_core.bundle.load_bundle_cached`:
    verified, without its stored calibration logits) and everything the selections file
    records about it comes from that one loaded object: its ``bundle_version``,
    ``bundle_manifest_sha256``, ``threshold``, ``temperature`` and primary score, and the bundle
    root (``bundle_dir``). Pass a version directory (``version_path``) to score with exactly that
    version while calibrations switch the bundle's pointer; pass the root for its current version.

    The file's header is checked against the bundle before any data is read; then the batch
    streams chunk by chunk (see the module docstring): memory follows ``chunk_rows``, whatever
    the batch's size, and concurrent calls share the memory budget. An empty file (no samples)
    gives an empty selections file with the full schema and a summary saying so (verdict
    ``"insufficient"``). The file is written atomically and replaces an earlier file of the same
    batch; if anything fails (a malformed chunk, a repeated sample id, a full disk), no partial
    file is left and the earlier file is kept.

    Parameters
    ----------
    bundle_dir : str or os.PathLike
        A bundle root or one of its version directories.
    logits_path : str or os.PathLike
        The query batch (any format of :mod:`seapig_core.sources`; probabilities are converted).
    output_dir : str or os.PathLike
    batch : str
        The batch name: a plain file-name stem.
    thresholds : DriftThresholds or mapping, optional
        The summary's drift verdict (:class:`seapig_core.drift.DriftThresholds`).
    chunk_rows : int, optional
        Rows per chunk (default :data:`seapig_core.sources.DEFAULT_CHUNK_ROWS`); fewer when
        that alone would exceed the memory budget.
    memory_budget_mb : int, optional
        The process-wide budget this call shares (:func:`memory_budget`).
    queue_rows : int, default 20
        Rows of the review queue returned.
    logits_sha256 : str, optional
        The input's SHA-256, when the caller already has it (the scoring ledger does). The
        file's metadata records it, or else the file's fast xxh3-128 fingerprint
        (:func:`input_fingerprint`).
    probabilities : bool, optional
        Whether the file holds probabilities (see :func:`seapig_core.sources.open_logits_file`).

    Returns
    -------
    dict
        ``batch``, ``path``, ``bundle_version``, ``bundle_manifest_sha256``, ``bundle_dir``,
        :func:`seapig_core.selections.summarize_selections`'s keys, ``review_queue`` (the
        ``queue_rows`` rejected samples to review first, JSON rows of
        :func:`seapig_core.review.review_queue`) and ``chunk_rows`` (used).

    Raises
    ------
    ValueError
        For a missing or invalid bundle or logits file, logits that do not fit the bundle
        (e.g. another class count), a bad batch name or an unwritable ``output_dir``.
    """
    bundle = _bundle(bundle_dir)
    path = selections_path(output_dir, batch)
    limits = check_drift_thresholds(thresholds)
    budget = memory_budget(memory_budget_mb)
    # Without a SHA-256 to record, the file is hashed as its chunks are read (the fingerprint
    # of the bytes scored, written into the file's footer at the close), not read twice.
    hashes = logits_sha256 is None and not store.is_entry(logits_path)
    with open_logits_file(logits_path, "logits_path", probabilities=probabilities, hash_while_reading=hashes) as source:
        check_source_fits(bundle, source)
        rows, need = _chunk_rows(bundle, source, chunk_rows, budget)
        summary = SelectionSummary(bundle, queue_rows)
        with budget.reserve(need), SelectionsWriter(
            path, selections_schema(bundle, source.id_kind, source.dtype), _metadata(bundle, batch, {})
        ) as writer:
            write_selections_stream(writer, bundle, source, chunk_rows=rows, summary=summary)
            writer.update_metadata(input_fingerprint(logits_path, logits_sha256, source=source))
    return {
        "batch": batch,
        "path": str(path),
        **_provenance(bundle),
        **summary.result(limits),
        "review_queue": summary.review_records(),
        "chunk_rows": rows,
    }


@dataclass
class ScoredRows:
    """The selections of one row range of a query file (:func:`score_rows`), ready to merge.

    Attributes
    ----------
    start, stop : int
        The row range.
    batches : list of pyarrow.RecordBatch
        Its selections, in input order (:func:`seapig_core.selections.selections_schema`).
    summary : SelectionSummary
        Its partial summary (:meth:`~seapig_core.selections.SelectionSummary.merge`).
    sample_ids : SampleIdSet
        Its sample ids, to refuse an id repeated across ranges when merging.
    schema : pyarrow.Schema
        The selections schema.
    """

    start: int
    stop: int
    batches: list[pa.RecordBatch]
    summary: SelectionSummary
    sample_ids: SampleIdSet
    schema: pa.Schema

    @property
    def rows(self) -> int:
        return int(sum(b.num_rows for b in self.batches))

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """Its selections record batches, in input order (what :func:`merge_rows` writes)."""
        return iter(self.batches)


def row_ranges(
    logits_path: str | os.PathLike[str], parts: int, *, chunk_rows: int | None = None, probabilities: bool | None = None
) -> list[tuple[int, int]]:
    """Split a query file's rows into at most ``parts`` consecutive ranges at chunk boundaries.

    Ranges start at multiples of ``chunk_rows`` (default
    :data:`seapig_core.sources.DEFAULT_CHUNK_ROWS`), so that scoring them apart reads the same
    chunks as one sequential run (and the merged summary's mean score is identical to it).
    """
    parts = check_positive_int(parts, "parts")
    rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else check_positive_int(chunk_rows, "chunk_rows")
    with open_logits_file(logits_path, "logits_path", probabilities=probabilities) as source:
        n = source.n_samples
    return _row_ranges(n, parts, rows)


def _row_ranges(n: int, parts: int, rows: int) -> list[tuple[int, int]]:
    """At most ``parts`` consecutive ranges of whole ``rows``-row chunks (the last may be short) covering ``n`` rows."""
    chunks = max(1, math.ceil(n / rows))
    per_part = math.ceil(chunks / parts)
    return [(a * rows, min((a + per_part) * rows, n)) for a in range(0, chunks, per_part)] if n else [(0, 0)]


def score_rows(
    bundle: SelectorBundle | str | os.PathLike[str],
    logits_path: str | os.PathLike[str],
    start: int,
    stop: int,
    *,
    chunk_rows: int | None = None,
    queue_rows: int = 20,
    probabilities: bool | None = None,
) -> ScoredRows:
    """Score rows ``start:stop`` of a query file: selections as Arrow record batches and a partial summary.

    For scale-out: each worker scores one row range (the bundle loaded once per process, by
    :func:`seapig_core.bundle.load_bundle_cached`, when given as a path), and
    :func:`merge_rows` writes the ranges into one selections file in input order, with the
    summary of the whole batch; the result equals :func:`score_file`'s. Memory holds the
    range's selections (about 40 bytes per row) and one chunk of logits.

    Parameters
    ----------
    bundle : SelectorBundle or path
        The bundle, or its root or version directory.
    logits_path : str or os.PathLike
    start, stop : int
        The row range (e.g. from :func:`row_ranges`).
    chunk_rows, queue_rows, probabilities
        As :func:`score_file`.

    Returns
    -------
    ScoredRows
    """
    loaded = _bundle(bundle)
    summary = SelectionSummary(loaded, queue_rows)
    seen = SampleIdSet()
    with open_logits_file(logits_path, "logits_path", probabilities=probabilities) as source:
        schema = selections_schema(loaded, source.id_kind, source.dtype)
        batches = list(iter_selections(loaded, source, start=start, stop=stop, chunk_rows=chunk_rows, summary=summary, seen=seen))
    return ScoredRows(int(start), int(stop), batches, summary, seen, schema)


def merge_rows(
    bundle: SelectorBundle | str | os.PathLike[str],
    parts: Sequence[ScoredRows],
    output_dir: str | os.PathLike[str],
    batch: str,
    *,
    thresholds: Any = None,
    logits_path: str | os.PathLike[str] | None = None,
    logits_sha256: str | None = None,
) -> dict[str, Any]:
    """Write row ranges scored apart (:func:`score_rows`) as one selections file, and summarise them.

    The parts must cover the file's rows consecutively, in input order; a sample id in two
    parts is refused. The file is written atomically (nothing is left if anything fails), with
    the same schema and metadata as :func:`score_file` gives, one row group per record batch
    of the parts (streamed: one at a time), and the returned dict is the one :func:`score_file`
    returns (without ``chunk_rows``).

    Parameters
    ----------
    bundle : SelectorBundle or path
        The bundle the parts were scored with.
    parts : sequence of ScoredRows or StagedRows
        In input order: :class:`ScoredRows` (record batches in memory) or
        :class:`seapig_core.scaleout.StagedRows` (record batches in a staged part file); any
        object with ``start``, ``stop``, ``summary``, ``sample_ids``, ``schema`` and
        ``iter_batches()``.
    output_dir, batch, thresholds
        As :func:`score_file`.
    logits_path : str or os.PathLike, optional
        The query file, for its fingerprint in the metadata (:func:`input_fingerprint`).
    logits_sha256 : str, optional
        Its SHA-256, when the caller has it (as :func:`score_file`).

    Raises
    ------
    ValueError
        For no parts, parts that are not consecutive, a repeated sample id, or parts of
        another bundle version.
    """
    loaded = _bundle(bundle)
    parts = list(parts)
    if not parts:
        raise ValueError("The 'parts' parameter must hold at least one ScoredRows. Got none.")
    for before, after in zip(parts, parts[1:], strict=False):
        if before.stop != after.start:
            raise ValueError(
                f"The 'parts' parameter must cover consecutive row ranges in input order. Got {before.start}:{before.stop} "
                f"followed by {after.start}:{after.stop}."
            )
    limits = check_drift_thresholds(thresholds)
    path = selections_path(output_dir, batch)
    seen = SampleIdSet()
    for part in parts:
        seen.merge(part.sample_ids)
    summary = merge_summaries([part.summary for part in parts], loaded)
    with SelectionsWriter(path, parts[0].schema, _metadata(loaded, batch, input_fingerprint(logits_path, logits_sha256))) as writer:
        for part in parts:
            for record_batch in part.iter_batches():
                writer.write(record_batch)
    return {
        "batch": batch,
        "path": str(path),
        **_provenance(loaded),
        **summary.result(limits),
        "review_queue": summary.review_records(),
    }


def calibration_review(
    bundle_dir: str | os.PathLike[str],
    plot_dir: str | os.PathLike[str] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Report:
    """The calibration report of a saved bundle (:func:`seapig_core.reports.calibration_report`).

    Parameters
    ----------
    bundle_dir : str or Path
        The bundle.
    plot_dir : str or Path, optional
        Also write the report's figures there as PNG files.
    provenance : mapping, optional
        What the report describes (``deployment``, ``flow_run``, ``input_files``, ...; see
        :mod:`seapig_core.reports`); ``bundle_dir`` defaults to ``bundle_dir``.
    """
    bundle = load_bundle(bundle_dir)
    given = dict(provenance or {})
    given.setdefault("bundle_dir", str(Path(bundle_dir)))
    report = calibration_report(bundle, provenance=given)
    if plot_dir is not None:
        report.save_figures(plot_dir)
    return report


def scoring_review(
    bundle_dir: str | os.PathLike[str],
    selections: Mapping[str, str | os.PathLike[str]],
    plot_dir: str | os.PathLike[str] | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    history: Any = None,
    thresholds: Any = None,
    queue_rows: int = 10,
) -> Report:
    """The scoring report of selections files by batch name (:func:`seapig_core.reports.scoring_report`).

    Made to be called from a task with paths and small dicts.

    Parameters
    ----------
    bundle_dir : str or Path
        The bundle the batches were scored with.
    selections : mapping of str to path
        Selections files (:func:`score_file`) by batch name.
    plot_dir : str or Path, optional
        Also write the figures there (``<batch>-density.png``, ``scoring-trend.png``).
    provenance : mapping, optional
        What the report describes (see :mod:`seapig_core.reports`); ``bundle_dir`` and
        ``selections_files`` default to the arguments.
    history : pandas.DataFrame or list of dict, optional
        Past runs for the trend chart (:func:`seapig_core.plotting.plot_drift_trend`).
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds, e.g. a deployment parameter
        (:class:`seapig_core.drift.DriftThresholds`).
    queue_rows : int, default 10
        Rows of each batch's review queue.
    """
    bundle = load_bundle(bundle_dir)
    tables = {batch: read_selections(path) for batch, path in selections.items()}
    given = dict(provenance or {})
    given.setdefault("bundle_dir", str(Path(bundle_dir)))
    given.setdefault("selections_files", {batch: str(path) for batch, path in selections.items()})
    report = scoring_report(
        bundle, tables, provenance=given, history=history, thresholds=thresholds, queue_rows=queue_rows
    )
    if plot_dir is not None:
        report.save_figures(plot_dir)
    return report
