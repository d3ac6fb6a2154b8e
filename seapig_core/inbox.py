"""Scheduled scoring of an inbox, exactly once: plan a run against the ledger, score its claims, archive.

A scoring run over a directory of logit files (the *inbox*) or over freshly extracted store
entries goes through three steps, each a plain function that a Prefect task wraps:

1. :func:`plan_scoring`: list the batches (:func:`seapig_core.sources.scan_logit_files` for an
   inbox; the given mapping for extracted entries), fingerprint their content and claim, in the
   scoring ledger of ``output_dir`` (:class:`seapig_core.ledger.Ledger`), those not yet scored
   for the bundle version the run resolved. Files whose content was scored before (under any
   name), claimed by another live run, refused by the scan, or gone meanwhile are reported,
   not scored. Its cost grows with the number of files in the inbox (a ``stat`` each, and the
   ledger's lookups), not with their size: content is hashed only when a file's stat changed.
2. :func:`score_claim`: score one claimed batch with exactly the bundle version the run
   resolved (:func:`seapig_core.pipeline.score_file` on the version directory), optionally
   move the input into an archive, and mark the claim done in the ledger (selections path,
   summary, archive path), or failed with the reason (the next run claims it again). Its two
   halves also stand alone, for runs that score elsewhere (Dask workers,
   :mod:`seapig_core.scaleout`) and record the outcome in the process that claimed:
   :func:`score_claimed` (scoring only) and :func:`complete_claim` / :func:`fail_claim`.
3. :func:`archive_input`: move an input file (with a store entry's manifest) into the archive
   directory: a rename within one file system, a copy then a no-replace link across file
   systems; a name already taken by a different file is never overwritten (the newcomer gets
   its content hash in its name), and an identical file already there absorbs the input.

The run's order per batch is *score, archive, complete*: a run that dies between two steps
leaves the input either in the inbox (the next run scores it again, rewriting the same
selections file) or in the archive with its selections written; nothing is lost and nothing
is scored twice by overlapping runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seapig_core._io import ensure_writable_dir, file_sha256, temporary_name
from seapig_core.ledger import Claim, Ledger
from seapig_core.pipeline import score_file
from seapig_core.sources import scan_logit_files
from seapig_core.store import entry_paths, is_entry

__all__ = [
    "ScoringPlan",
    "archive_input",
    "check_scoring_dirs",
    "claim_logits_sha256",
    "complete_claim",
    "fail_claim",
    "plan_scoring",
    "score_claim",
    "score_claimed",
]

_STORE_SUFFIX = ".logits.arrow"
_FINGERPRINT_ATTEMPTS = 5


@dataclass(frozen=True)
class ScoringPlan:
    """What a scoring run does: the batches it claimed, and why it leaves the others.

    Attributes
    ----------
    output_dir : str
        The selections directory; its ledger holds the claims.
    bundle_version : str
        The bundle version the run scores with.
    claims : tuple of Claim
        Batches this run claimed: it must score each, then complete or fail it.
    done : dict of str to str
        Batch -> selections file, for batches whose content an earlier run scored.
    busy : tuple of str
        Batches claimed by another run that is still alive.
    duplicates : dict of str to str
        Batch -> the batch of this source with the same content (scored once, under that name).
    refused : dict of str to str
        File -> reason, for inbox files that cannot be batches (see :func:`scan_logit_files`).
    gone : tuple of str
        Batches listed but removed before they were fingerprinted (e.g. archived by an
        overlapping run).
    """

    output_dir: str
    bundle_version: str
    claims: tuple[Claim, ...] = ()
    done: dict[str, str] = field(default_factory=dict)
    busy: tuple[str, ...] = ()
    duplicates: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    gone: tuple[str, ...] = ()

    @property
    def nothing_new(self) -> bool:
        """True when the run has nothing to score (and nothing refused)."""
        return not self.claims and not self.refused

    def describe(self) -> str:
        """One sentence for the run's log: what is scored now and why the rest is not."""
        parts = [f"{len(self.claims)} batch(es) to score with bundle version {self.bundle_version}"]
        for count, what in (
            (len(self.done), "already scored"),
            (len(self.busy), "being scored by another run"),
            (len(self.duplicates), "duplicate content of another batch"),
            (len(self.gone), "removed meanwhile"),
            (len(self.refused), "refused"),
        ):
            if count:
                parts.append(f"{count} {what}")
        prefix = "Nothing new: " if not self.claims else ""
        return prefix + "; ".join(parts) + "."


def check_scoring_dirs(
    output_dir: str | os.PathLike[str],
    logits_dir: str | os.PathLike[str] | None = None,
    archive_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Check the directories of a scoring run before any work: fail early, naming the parameter.

    ``output_dir`` (and ``archive_dir``) must be writable directories (created if needed);
    neither may be the inbox ``logits_dir`` itself (selections would be read back as batches;
    an input would be "archived" onto itself), nor may they be the same directory.

    Raises
    ------
    ValueError
        Naming the parameter and the directory.
    """
    ensure_writable_dir(output_dir, "output_dir")
    named = {"output_dir": Path(output_dir).resolve()}
    if archive_dir is not None:
        ensure_writable_dir(archive_dir, "archive_dir")
        named["archive_dir"] = Path(archive_dir).resolve()
        if named["archive_dir"] == named["output_dir"]:
            raise ValueError(
                f"The 'archive_dir' parameter must be another directory than 'output_dir'. Got {str(archive_dir)!r} for both."
            )
    if logits_dir is not None:
        inbox = Path(logits_dir).resolve()
        for name, directory in named.items():
            if directory == inbox:
                raise ValueError(
                    f"The '{name}' parameter must be another directory than the inbox 'logits_dir'. Got {str(logits_dir)!r} for both."
                )


def _fingerprints(ledger: Ledger, batches: Mapping[str, Path]) -> tuple[dict[str, str], list[str]]:
    """Content hashes of the batches still present, and the batches that disappeared meanwhile."""
    present = dict(batches)
    gone: list[str] = []
    for _ in range(_FINGERPRINT_ATTEMPTS):
        try:
            return ledger.fingerprints(present), gone
        except ValueError:
            vanished = [batch for batch, path in present.items() if not os.path.lexists(path)]
            if not vanished:
                raise  # unreadable, not gone: the error names the file
            gone += vanished
            present = {batch: path for batch, path in present.items() if batch not in vanished}
    return ledger.fingerprints(present), gone


def plan_scoring(
    source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    bundle_version: str,
    *,
    rescore_on_new_bundle: bool = False,
    run_id: str | None = None,
    deployment: str | None = None,
) -> ScoringPlan:
    """Claim, in the ledger of ``output_dir``, the batches of ``source`` that this run must score.

    Parameters
    ----------
    source : str, os.PathLike or mapping of str to path
        An inbox directory (every logit file is a batch, see
        :func:`seapig_core.sources.scan_logit_files`), or batch name -> file (e.g. the store
        entries an extraction wrote).
    output_dir : str or os.PathLike
        The selections directory; its ledger (:class:`seapig_core.ledger.Ledger`) is shared
        by every run writing there.
    bundle_version : str
        The bundle version this run resolved (:func:`seapig_core.bundle.load_bundle`).
    rescore_on_new_bundle : bool, default False
        Score again contents that were scored with another bundle version.
    run_id, deployment : str, optional
        Recorded with the claims (history, reports).

    Returns
    -------
    ScoringPlan

    Raises
    ------
    ValueError
        If the inbox does not exist, ``output_dir`` cannot be written, or a file cannot be read
        (named).
    """
    if isinstance(source, Mapping):
        batches = {str(batch): Path(path) for batch, path in source.items()}
        refused: dict[str, str] = {}
    else:
        found = scan_logit_files(source, "logits_dir")
        batches, refused = dict(found.batches), dict(found.refused)
    ledger = Ledger(output_dir)
    hashes, gone = _fingerprints(ledger, batches)
    first_of: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for batch in hashes:
        content = hashes[batch]
        if content in first_of:
            duplicates[batch] = first_of[content]
        else:
            first_of[content] = batch
    unique = {batch: batches[batch] for batch in first_of.values()}
    claims, skipped = ledger.claim(
        unique, bundle_version, rescore_on_new_bundle=rescore_on_new_bundle, run_id=run_id, deployment=deployment,
        fingerprints={batch: hashes[batch] for batch in unique},
    )
    done: dict[str, str] = {}
    busy: list[str] = []
    for entry in skipped:
        batch = first_of[entry.content_sha256]  # the name in this source (the ledger may know another)
        if entry.state == "done" and entry.selections_path:
            done[batch] = entry.selections_path
        else:
            busy.append(batch)
    return ScoringPlan(
        output_dir=str(ledger.output_dir), bundle_version=bundle_version, claims=tuple(claims), done=done,
        busy=tuple(sorted(busy)), duplicates=duplicates, refused=refused, gone=tuple(gone),
    )


def claim_logits_sha256(claim: Claim) -> str | None:
    """The content hash a selections file of ``claim`` records, when the claim already has it.

    The claim's content hash is the file's SHA-256: scoring passes it on rather than hash the
    file again. A store entry's provenance hash is its manifest's, which scoring reads (None).
    """
    return None if is_entry(claim.input_path) else claim.content_sha256


def score_claimed(
    claim: Claim,
    bundle_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    thresholds: Any = None,
    chunk_rows: int | None = None,
    memory_budget_mb: int | None = None,
) -> dict[str, Any]:
    """Write the selections of one claimed batch (:func:`seapig_core.pipeline.score_file`); the ledger is not touched.

    The scoring half of :func:`score_claim`, for runs that score on other processes or machines
    (a Dask worker) and record the outcome where the claim was made (:func:`complete_claim`,
    :func:`fail_claim`). Parameters as :func:`score_claim`.
    """
    return score_file(
        bundle_path, claim.input_path, output_dir, claim.batch, thresholds=thresholds, chunk_rows=chunk_rows,
        memory_budget_mb=memory_budget_mb, logits_sha256=claim_logits_sha256(claim),
    )


def complete_claim(
    claim: Claim,
    result: dict[str, Any],
    output_dir: str | os.PathLike[str],
    *,
    archive_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Record a claimed batch whose selections are written: check its input, archive it if asked, mark it done.

    The input must still hold the content that was claimed (a file replaced while it was scored
    is failed, and the next run scores its new content); then it is moved into ``archive_dir``
    (:func:`archive_input`) and the claim is marked done in the ledger of ``output_dir`` with
    the selections path and the summary.

    Parameters
    ----------
    claim : Claim
        From :func:`plan_scoring`.
    result : dict
        What scoring returned (:func:`seapig_core.pipeline.score_file`, or the merge of row
        ranges, :func:`seapig_core.scaleout.merge_ranges`): its ``path`` and summary.
    output_dir : str or os.PathLike
        The selections directory (the ledger's).
    archive_dir : str or os.PathLike, optional
        Move the input there (:func:`archive_input`).

    Returns
    -------
    dict
        ``result`` with ``archived_path`` (or None).

    Raises
    ------
    Exception
        Whatever the check, the archive or the ledger raised; the claim is then marked failed
        with the reason, and the next run claims the batch again.
    """
    ledger = Ledger(output_dir)
    try:
        now = ledger.fingerprints({claim.batch: claim.input_path})[claim.batch]  # stat-cached: no re-read if unchanged
        if now != claim.content_sha256:
            raise ValueError(
                f"The input file {claim.input_path!r} of batch {claim.batch!r} changed while it was being scored; "
                f"the next run scores its new content."
            )
        archived = None if archive_dir is None else str(archive_input(claim.input_path, archive_dir, claim.batch))
        summary = {key: value for key, value in result.items() if key not in ("batch", "path")}
        ledger.complete(claim, result["path"], summary, archived_path=archived)
    except Exception as exc:
        ledger.fail(claim, f"{type(exc).__name__}: {exc}")
        raise
    return {**result, "archived_path": archived}


def fail_claim(claim: Claim, reason: str, output_dir: str | os.PathLike[str]) -> None:
    """Mark a claimed batch failed in the ledger of ``output_dir``, with the reason: the next run claims it again."""
    Ledger(output_dir).fail(claim, reason)


def score_claim(
    claim: Claim,
    bundle_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    archive_dir: str | os.PathLike[str] | None = None,
    thresholds: Any = None,
    chunk_rows: int | None = None,
    memory_budget_mb: int | None = None,
) -> dict[str, Any]:
    """Score one claimed batch, archive its input if asked, and record the outcome in the ledger.

    :func:`score_claimed`, then :func:`complete_claim` (or :func:`fail_claim`), in this process.

    Parameters
    ----------
    claim : Claim
        From :func:`plan_scoring`.
    bundle_path : str or os.PathLike
        The bundle *version* directory the run resolved (``version_path``), so that every batch
        of the run is scored with the same version while calibrations switch the pointer.
    output_dir : str or os.PathLike
        The selections directory (the ledger's).
    archive_dir : str or os.PathLike, optional
        Move the input there once its selections are written (:func:`archive_input`).
    thresholds : DriftThresholds or mapping, optional
        The drift verdict's thresholds (:func:`seapig_core.pipeline.score_file`); the ledger
        records the verdict they give.
    chunk_rows : int, optional
        Rows per streamed chunk (:func:`seapig_core.pipeline.score_file`).
    memory_budget_mb : int, optional
        The process-wide memory budget the run's concurrent batches share
        (:func:`seapig_core.pipeline.memory_budget`; default ``$SEAPIG_MEMORY_BUDGET_MB`` or
        1024 MB).

    Returns
    -------
    dict
        :func:`seapig_core.pipeline.score_file`'s summary, with ``archived_path`` (or None).

    Raises
    ------
    Exception
        Whatever scoring or archiving raised; the claim is then marked failed with the reason,
        and the next run claims the batch again.
    """
    try:
        result = score_claimed(
            claim, bundle_path, output_dir, thresholds=thresholds, chunk_rows=chunk_rows, memory_budget_mb=memory_budget_mb
        )
    except Exception as exc:
        fail_claim(claim, f"{type(exc).__name__}: {exc}", output_dir)
        raise
    return complete_claim(claim, result, output_dir, archive_dir=archive_dir)


# ----------------------------------------------------------------------------- archive


def _companions(path: Path, batch: str | None) -> list[Path]:
    """The files that make up one input: a store entry's data file and manifest, else the file."""
    if batch is not None and path.name.endswith(_STORE_SUFFIX):
        data, manifest = entry_paths(path.parent, batch)
        if data == path and manifest.exists():
            return [data, manifest]
    return [path]


def _same_content(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)
    except OSError:
        return False


def _link_no_replace(source: Path, destination: Path) -> bool:
    """Give ``source`` the extra name ``destination`` unless it is taken; True if done.

    Raises ``OSError(EXDEV)`` across file systems. On a file system without hard links the name
    is reserved exclusively and then replaced by ``source`` (only this call owns the reservation).
    """
    try:
        os.link(source, destination, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    try:
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    shutil.copy2(source, destination)  # over our own empty reservation; ``source`` is removed by the caller
    return True


def _move_one(source: Path, destination: Path) -> bool:
    """Move ``source`` to ``destination`` without ever replacing another file there; True if moved.

    Within one file system: a hard link under the new name, then the old name is removed (the
    content is never copied, never half there). Across file systems (or for a symlink): the
    content is copied to an owned temporary in the destination directory, flushed, linked
    under the new name, and only then is ``source`` removed.
    """
    if not source.is_symlink():
        try:
            if not _link_no_replace(source, destination):
                return False
            source.unlink()
            return True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    staging = destination.parent / temporary_name(destination.name)
    try:
        shutil.copyfile(source, staging)  # follows a symlink: the archive keeps the content
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        if not _link_no_replace(staging, destination):
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    source.unlink()
    return True


def _candidates(files: list[Path], batch: str | None, archive: Path, digest: str) -> list[list[Path]]:
    """Destination names for ``files``: their own names, then with the content hash, then numbered."""
    entry = len(files) == 2
    stems = [None, f"-{digest[:12]}"] + [f"-{digest[:12]}-{i}" for i in range(2, 100)]
    out = []
    for tag in stems:
        if entry:
            out.append(list(entry_paths(archive, f"{batch}{tag or ''}")))
        elif tag is None:
            out.append([archive / files[0].name])
        else:
            name = files[0].name
            stem, dot, suffix = name.partition(".")
            out.append([archive / f"{stem}{tag}{dot}{suffix}"])
    return out


def archive_input(
    path: str | os.PathLike[str], archive_dir: str | os.PathLike[str], batch: str | None = None
) -> Path:
    """Move an input file into ``archive_dir``; return where it is now.

    A store entry (``<batch>.logits.arrow``) moves with its manifest. The file keeps its name
    unless that name is taken in the archive: by identical content (the input is dropped from
    the inbox, nothing is lost), or by a different file, which is never overwritten: the input
    then gets the first 12 hex digits of its SHA-256 in its name (``batch-007-1a2b3c4d5e6f.npz``).

    Parameters
    ----------
    path : str or os.PathLike
        The input file.
    archive_dir : str or os.PathLike
        The archive directory (created if needed).
    batch : str, optional
        The batch name (to recognise a store entry and name its manifest).

    Returns
    -------
    pathlib.Path
        The input's (data file's) path in the archive.

    Raises
    ------
    ValueError
        If the input is missing or the archive cannot be written.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"The input file {str(path)!r} cannot be archived: it does not exist.")
    archive = ensure_writable_dir(archive_dir, "archive_dir")
    files = _companions(path, batch)
    digest = file_sha256(path)
    for destinations in _candidates(files, batch, archive, digest):
        taken = [d for d in destinations if d.exists() or d.is_symlink()]
        if taken:
            if len(taken) == len(destinations) and all(_same_content(s, d) for s, d in zip(files, destinations, strict=True)):
                for source in files:
                    source.unlink()
                return destinations[0]
            continue
        moved: list[tuple[Path, Path]] = []
        for source, destination in zip(files, destinations, strict=True):
            if not _move_one(source, destination):
                break  # taken meanwhile by another archiver: try the next name for the rest
            moved.append((source, destination))
        if len(moved) == len(files):
            return destinations[0]
        if moved:  # a store entry half moved: keep its parts together under the next name
            files = [d for _, d in moved] + files[len(moved):]
    raise ValueError(f"The input file {str(path)!r} could not be archived in {str(archive)!r}: every candidate name is taken.")
