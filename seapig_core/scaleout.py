"""Scale-out: one query batch split into row ranges scored apart and merged, and the Dask settings of a run.

The scoring flow runs on a Dask cluster (through prefect-dask) when its ``dask`` parameter
names one; this module holds what that needs without importing Prefect or Dask: the
parameter's validation (:func:`check_dask_options`, :class:`DaskOptions`) and the three steps
of a *split* batch, each a plain function that a task runs wherever the cluster puts it:

1. :func:`plan_split` (in the process that claimed the batch): a batch of more than
   ``split_rows`` rows gets at most ``ceil(rows / split_rows)`` consecutive row ranges cut at chunk
   boundaries (:func:`seapig_core.pipeline.row_ranges`), the chunk size every range uses, and a
   *staging directory*: a hidden, owned temporary directory inside ``output_dir``
   (:func:`seapig_core._io.temporary_name`), so that a run killed mid-way leaves it only until
   the next write there (:func:`seapig_core._io.sweep_stale_temporaries`);
2. :func:`score_range` (on any worker): the range's selections streamed chunk by chunk into an
   Arrow IPC part file in the staging directory (written atomically), returning only a
   :class:`StagedRows`: the part's path, its partial summary
   (:class:`~seapig_core.selections.SelectionSummary`) and its sample-id set;
3. :func:`merge_ranges` (on any worker, once every range is staged): the parts streamed, record
   batch by record batch, into ``<output_dir>/<batch>.selections.parquet``
   (:func:`seapig_core.pipeline.merge_rows`, atomic), with the summary of the whole batch; the
   staging directory is removed whatever happens (:func:`discard_split` does it for a batch
   whose range failed).

Identical to the sequential run: the ranges start at multiples of the chunk size and every
range streams with that chunk size, so the record batches (the selections file's row groups)
and the per-chunk partial sums of the summary are those of
:func:`seapig_core.pipeline.score_file`; the merged file has the same bytes, and the summary
the same values.

Memory
------
A range streams like :func:`~seapig_core.pipeline.score_file` (one chunk at a time, within the
worker process's :class:`~seapig_core.pipeline.MemoryBudget`); the merge holds one record
batch at a time (the parts are memory-mapped). What travels through the cluster per range is
its :class:`StagedRows`: the partial summary (16 bytes per distinct calibration score, up to
80 kB of scores for small ranges, the review queue's rows) and the sample-id set (16 bytes
per id, except runs of consecutive integer ids, which take 16 bytes per run). The merge holds
every part's summary and the whole batch's id set at once, as one sequential run does.

Requirements on a cluster of several machines: the query file, the bundle directory and
``output_dir`` must be on a file system every worker and the flow's process see under the
same paths (the workers read the input and the bundle and write the parts and the selections
file).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from seapig_core._io import atomic_path, ensure_writable_dir, is_temporary_name, sweep_stale_temporaries, temporary_name
from seapig_core._validation import check_positive_int
from seapig_core.bundle import load_bundle_cached
from seapig_core.pipeline import _chunk_rows, _row_ranges, memory_budget, merge_rows, scoring_working_set
from seapig_core.selections import (
    SelectionSummary,
    check_source_fits,
    iter_selections,
    selections_path,
    selections_schema,
)
from seapig_core.sources import SampleIdSet, open_logits_file

__all__ = [
    "DaskOptions",
    "SplitPlan",
    "StagedRows",
    "check_dask_options",
    "check_split_rows",
    "discard_split",
    "merge_ranges",
    "plan_split",
    "score_range",
]

# ----------------------------------------------------------------------------- the `dask` parameter

_LOCAL_KEYS = ("n_workers", "threads_per_worker", "memory_limit")
_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*([kKMGTP]i?)?B?\s*$")
_EXAMPLE = (
    "{'address': 'tcp://scheduler:8786'} (an existing cluster) or {'n_workers': 2, 'threads_per_worker': 1} (a LocalCluster)"
)


@dataclass(frozen=True)
class DaskOptions:
    """Where a scoring run's tasks run: an existing Dask cluster by address, or a LocalCluster it starts.

    Built by :func:`check_dask_options` from the flow's ``dask`` parameter.

    Attributes
    ----------
    address : str or None
        The scheduler of an existing cluster (``tcp://host:8786``); None for a LocalCluster.
    n_workers, threads_per_worker : int or None
        The LocalCluster's worker processes and threads per worker (Dask's defaults when None:
        about one worker per core).
    memory_limit : str or int or None
        The LocalCluster's memory limit per worker (``"4GiB"``, bytes, ``"auto"``).
    """

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None

    @property
    def local(self) -> bool:
        """True when the run starts (and stops) its own LocalCluster."""
        return self.address is None

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``distributed.LocalCluster`` (worker processes, no dashboard); empty for an address."""
        if not self.local:
            return {}
        given = {key: getattr(self, key) for key in _LOCAL_KEYS if getattr(self, key) is not None}
        # Processes, not threads: each worker loads the bundle once and scores without the GIL.
        return {"processes": True, "dashboard_address": None, **given}

    def to_dict(self) -> dict[str, Any]:
        """The parameter's form (only the given keys)."""
        return {key: value for key, value in self.__dict__.items() if value is not None}

    def describe(self) -> str:
        """A phrase for the run's log: which cluster."""
        if not self.local:
            return f"the Dask cluster at {self.address}"
        workers = "Dask's default number of" if self.n_workers is None else str(self.n_workers)
        threads = "" if self.threads_per_worker is None else f" with {self.threads_per_worker} thread(s) each"
        return f"a LocalCluster of {workers} worker process(es){threads}"


def _check_address(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"The '{name}' parameter's 'address' must be a str such as 'tcp://scheduler:8786'. "
            f"Got {type(value).__name__} instead."
        )
    address = value.strip()
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if not rest or any(c.isspace() for c in address) or scheme not in _SCHEMES or (scheme != "inproc" and ":" not in rest):
        raise ValueError(
            f"The '{name}' parameter's 'address' must be a Dask scheduler address such as 'tcp://scheduler:8786' "
            f"(scheme one of {list(_SCHEMES)}, then host:port). Got {value!r} instead."
        )
    return address


def check_dask_options(dask: Any, name: str = "dask") -> DaskOptions | None:
    """Validate a run's ``dask`` parameter: None (no Dask), an existing cluster's address, or a LocalCluster's size.

    Parameters
    ----------
    dask : dict, DaskOptions or None
        ``{"address": "tcp://host:8786"}`` for an existing cluster (nothing else with it), or
        any of ``n_workers``, ``threads_per_worker`` (positive integers) and ``memory_limit``
        (``"4GiB"``, a positive number of bytes, ``"auto"``) for a LocalCluster the run starts
        (``{}``: Dask's defaults); None for no Dask.
    name : str
        The parameter's name in error messages.

    Returns
    -------
    DaskOptions or None

    Raises
    ------
    TypeError
        If ``dask`` is not a dict (or None), or a value has the wrong type.
    ValueError
        Naming ``name``: an unknown key, an address with LocalCluster keys, a malformed
        address, or a size that is not positive.
    """
    if dask is None or isinstance(dask, DaskOptions):
        return dask
    if not isinstance(dask, Mapping):
        raise TypeError(
            f"The '{name}' parameter must be a dict such as {_EXAMPLE}, or null. Got {type(dask).__name__} instead."
        )
    unknown = sorted(str(key) for key in dask if key not in ("address", *_LOCAL_KEYS))
    if unknown:
        raise ValueError(
            f"The '{name}' parameter knows the keys 'address' (an existing cluster) and {list(_LOCAL_KEYS)} "
            f"(a LocalCluster). "
            f"Got unknown key(s) {unknown}."
        )
    if "address" in dask:
        others = sorted(key for key in dask if key != "address")
        if others:
            raise ValueError(
                f"The '{name}' parameter names either an existing cluster ('address') or a LocalCluster to start "
                f"({list(_LOCAL_KEYS)}), not both. Got 'address' with {others}."
            )
        return DaskOptions(address=_check_address(dask["address"], name))
    sizes = {
        key: check_positive_int(dask[key], f"{name}.{key}")
        for key in ("n_workers", "threads_per_worker")
        if dask.get(key) is not None
    }
    memory = dask.get("memory_limit")
    if memory is not None:
        if isinstance(memory, str):
            if memory.strip() != "auto" and not _MEMORY.match(memory):
                raise ValueError(
                    f"The '{name}.memory_limit' parameter must be like '4GiB', '512MB' or 'auto'. Got {memory!r} instead."
                )
        else:
            memory = check_positive_int(memory, f"{name}.memory_limit")
    return DaskOptions(memory_limit=memory, **sizes)


def check_split_rows(split_rows: Any, name: str = "split_rows") -> int | None:
    """None (never split a batch) or a positive number of rows."""
    return None if split_rows is None else check_positive_int(split_rows, name)


# ----------------------------------------------------------------------------- split batches


@dataclass(frozen=True)
class SplitPlan:
    """How one batch is scored in row ranges (:func:`plan_split`): small, picklable, sent to every range task.

    Attributes
    ----------
    batch : str
        The batch name (the selections file is ``<output_dir>/<batch>.selections.parquet``).
    logits_path, bundle_path, output_dir : str
        The query file, the bundle (version) directory, the selections directory.
    staging_dir : str
        The owned temporary directory inside ``output_dir`` that holds the part files.
    ranges : tuple of (int, int)
        Consecutive row ranges covering the file, in input order.
    chunk_rows : int
        Rows per chunk, the same in every range (and the ranges start at its multiples).
    n_samples : int
        Rows of the file.
    logits_sha256 : str or None
        The input's content hash for the selections' metadata (None: the merge hashes it).
    probabilities : bool or None
        Whether the file holds probabilities (:func:`seapig_core.sources.open_logits_file`).
    """

    batch: str
    logits_path: str
    bundle_path: str
    output_dir: str
    staging_dir: str
    ranges: tuple[tuple[int, int], ...]
    chunk_rows: int
    n_samples: int
    logits_sha256: str | None = None
    probabilities: bool | None = None

    def part_path(self, index: int) -> Path:
        """The part file of range ``index``."""
        return Path(self.staging_dir) / f"part-{index:05d}.arrow"


def plan_split(
    bundle_path: str | os.PathLike[str],
    logits_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    batch: str,
    *,
    split_rows: int,
    chunk_rows: int | None = None,
    memory_budget_mb: int | None = None,
    logits_sha256: str | None = None,
    probabilities: bool | None = None,
) -> SplitPlan | None:
    """Plan the row ranges of a batch of more than ``split_rows`` rows, and create its staging directory.

    Only the file's header is read (and checked against the bundle). The ranges are at most
    ``ceil(rows / split_rows)`` consecutive ranges of whole chunks, as equal as the chunks
    allow (:func:`seapig_core.pipeline.row_ranges`): a range holds at least one chunk and may
    exceed ``split_rows`` by less than one chunk. The chunk size is the one
    :func:`~seapig_core.pipeline.score_file` would use here (``chunk_rows``, fewer when that
    alone exceeds the memory budget), so the merged result equals the sequential one.

    Call it in the process that owns the run (it owns the staging directory: if that process
    dies, the next write in ``output_dir`` removes the directory), and end the plan with
    :func:`merge_ranges` or :func:`discard_split`.

    Parameters
    ----------
    bundle_path : str or os.PathLike
        The bundle version directory the run resolved (or a bundle root).
    logits_path : str or os.PathLike
        The query batch.
    output_dir : str or os.PathLike
        The selections directory (created if needed).
    batch : str
        The batch name: a plain file-name stem.
    split_rows : int
        Split batches of more rows than this.
    chunk_rows : int, optional
        Rows per chunk (default :data:`seapig_core.sources.DEFAULT_CHUNK_ROWS`).
    memory_budget_mb : int, optional
        The budget that decides the chunk size (:func:`seapig_core.pipeline.memory_budget`).
    logits_sha256 : str, optional
        The input's content hash, when known (the ledger's claim has it).
    probabilities : bool, optional
        Whether the file holds probabilities.

    Returns
    -------
    SplitPlan or None
        None when the batch has at most ``split_rows`` rows (score it whole).

    Raises
    ------
    ValueError
        For a bad ``split_rows`` or batch name, an unwritable ``output_dir``, a file that cannot
        be read or does not fit the bundle.
    """
    split_rows = check_positive_int(split_rows, "split_rows")
    target = selections_path(output_dir, batch)  # validates the batch name
    bundle = load_bundle_cached(bundle_path)
    budget = memory_budget(memory_budget_mb)
    with open_logits_file(logits_path, "logits_path", probabilities=probabilities) as source:
        check_source_fits(bundle, source)
        n = source.n_samples
        rows, _ = _chunk_rows(bundle, source, chunk_rows, budget)
    if n <= split_rows:
        return None
    directory = ensure_writable_dir(output_dir, "output_dir")
    sweep_stale_temporaries(directory)
    staging = directory / temporary_name(f"{batch}.ranges")
    staging.mkdir()
    return SplitPlan(
        batch=batch, logits_path=str(logits_path), bundle_path=str(bundle_path), output_dir=str(target.parent),
        staging_dir=str(staging), ranges=tuple(_row_ranges(n, math.ceil(n / split_rows), rows)), chunk_rows=rows,
        n_samples=n, logits_sha256=logits_sha256, probabilities=probabilities,
    )


@dataclass
class StagedRows:
    """One row range scored into a part file (:func:`score_range`): what :func:`merge_ranges` needs of it.

    Attributes
    ----------
    index, start, stop : int
        The range's position in the plan and its rows.
    path : str
        Its part file (Arrow IPC, one record batch per chunk).
    summary : SelectionSummary
        Its partial summary (:meth:`~seapig_core.selections.SelectionSummary.merge`).
    sample_ids : SampleIdSet
        Its sample ids (an id in two ranges is refused when merging).
    schema : pyarrow.Schema
        The selections schema.
    scored_by : str
        ``host:pid`` of the process that scored it.
    """

    index: int
    start: int
    stop: int
    path: str
    summary: SelectionSummary
    sample_ids: SampleIdSet
    schema: pa.Schema
    scored_by: str

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The part's record batches in input order, memory-mapped (one at a time in memory).

        Raises
        ------
        ValueError
            If the part file is missing, or does not hold this range's rows with its schema.
        """
        path = Path(self.path)
        try:
            with pa.memory_map(str(path)) as mapped:
                reader = pa.ipc.open_file(mapped)
                if not reader.schema.equals(self.schema, check_metadata=False):
                    raise ValueError(f"it has the columns {reader.schema.names}, not {self.schema.names}")
                rows = 0
                for i in range(reader.num_record_batches):
                    record_batch = reader.get_batch(i)
                    rows += record_batch.num_rows
                    yield record_batch
                if rows != self.stop - self.start:
                    expected = self.stop - self.start
                    raise ValueError(f"it holds {rows} rows, not the {expected} of rows {self.start}:{self.stop}")
        except (OSError, pa.ArrowInvalid, ValueError) as exc:
            raise ValueError(
                f"The part file {str(path)!r} of rows {self.start}:{self.stop} cannot be merged: {exc}"
            ) from exc


def score_range(
    plan: SplitPlan, index: int, *, memory_budget_mb: int | None = None, queue_rows: int = 20
) -> StagedRows:
    """Score range ``index`` of a split batch into its part file in the staging directory.

    The bundle is loaded once per process (:func:`seapig_core.bundle.load_bundle_cached`), so a
    worker scoring many ranges and batches verifies it once. The range streams chunk by chunk
    (``plan.chunk_rows`` rows, the sample ids checked for repeats within the range), within this
    process's memory budget, into an Arrow IPC file written atomically; a failure leaves no
    part file.

    Parameters
    ----------
    plan : SplitPlan
        From :func:`plan_split`.
    index : int
        Which of ``plan.ranges``.
    memory_budget_mb : int, optional
        The budget of this process (:func:`seapig_core.pipeline.memory_budget`); the range
        reserves its working set in it.
    queue_rows : int, default 20
        Rows of the review queue kept.

    Returns
    -------
    StagedRows

    Raises
    ------
    ValueError
        For an index outside the plan, a staging directory already removed (the batch failed
        or was discarded), or what scoring raises (a malformed chunk, a repeated sample id,
        logits that do not fit the bundle), naming the file.
    """
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(plan.ranges):
        raise ValueError(
            f"The 'index' parameter must be a range of the plan, in [0, {len(plan.ranges)}). Got {index!r} instead."
        )
    start, stop = plan.ranges[index]
    staging = Path(plan.staging_dir)
    if not staging.is_dir():
        raise ValueError(
            f"The staging directory {str(staging)!r} of batch {plan.batch!r} is gone: the batch failed or was discarded."
        )
    bundle = load_bundle_cached(plan.bundle_path)
    budget = memory_budget(memory_budget_mb)
    summary = SelectionSummary(bundle, queue_rows)
    seen = SampleIdSet()
    path = plan.part_path(index)
    with open_logits_file(plan.logits_path, "logits_path", probabilities=plan.probabilities) as source:
        check_source_fits(bundle, source)
        schema = selections_schema(bundle, source.id_kind, source.dtype)
        need = scoring_working_set(bundle, source, plan.chunk_rows)
        with budget.reserve(need), atomic_path(path) as tmp, pa.ipc.new_file(str(tmp), schema) as writer:
            for record_batch in iter_selections(
                bundle, source, start=start, stop=stop, chunk_rows=plan.chunk_rows, summary=summary, seen=seen
            ):
                writer.write_batch(record_batch)
    return StagedRows(index, start, stop, str(path), summary, seen, schema, f"{socket.gethostname()}:{os.getpid()}")


def merge_ranges(plan: SplitPlan, parts: Sequence[StagedRows], *, thresholds: Any = None) -> dict[str, Any]:
    """Merge the staged ranges of a split batch into its one selections file, and remove the staging directory.

    The parts (in any order; they are sorted by position) must be exactly the plan's ranges.
    The file is written atomically (:func:`seapig_core.pipeline.merge_rows`: a sample id in two
    ranges, a missing or damaged part, a full disk leave no file and the previous one in
    place); the staging directory is removed whether the merge succeeds or fails.

    Parameters
    ----------
    plan : SplitPlan
    parts : sequence of StagedRows
        From :func:`score_range`, one per range.
    thresholds : DriftThresholds or mapping, optional
        The summary's drift verdict (:class:`seapig_core.drift.DriftThresholds`).

    Returns
    -------
    dict
        :func:`seapig_core.pipeline.score_file`'s dict (the same values as a sequential run),
        with ``ranges``: per range its ``start``, ``stop`` and ``scored_by`` (``host:pid``).

    Raises
    ------
    ValueError
        If the parts are not the plan's ranges, or as :func:`~seapig_core.pipeline.merge_rows`.
    """
    try:
        ordered = sorted(parts, key=lambda part: part.start)
        got = [(part.start, part.stop) for part in ordered]
        if got != list(plan.ranges):
            raise ValueError(f"The 'parts' parameter must hold the plan's row ranges {list(plan.ranges)}. Got {got}.")
        result = merge_rows(
            plan.bundle_path, ordered, plan.output_dir, plan.batch, thresholds=thresholds,
            logits_path=plan.logits_path if plan.logits_sha256 is None else None, logits_sha256=plan.logits_sha256,
        )
    finally:
        discard_split(plan)
    ranges = [{"start": part.start, "stop": part.stop, "scored_by": part.scored_by} for part in ordered]
    return {**result, "chunk_rows": plan.chunk_rows, "ranges": ranges}


def discard_split(plan: SplitPlan) -> None:
    """Remove the staging directory of a split batch and its part files (nothing happens if it is gone).

    Call it once no range task of the plan can still write (a range finishing later fails:
    its directory is gone).
    """
    staging = Path(plan.staging_dir)
    if not is_temporary_name(staging.name) or staging.parent.resolve() != Path(plan.output_dir).resolve():
        raise ValueError(
            f"The plan's staging directory {str(staging)!r} is not an owned temporary directory of {plan.output_dir!r}; "
            f"it is not removed."
        )
    shutil.rmtree(staging, ignore_errors=True)
