"""The scoring ledger: which input was scored, with which bundle version, and where its selections are.

Scheduled scoring runs over an inbox again and again, and runs overlap (a manual run beside a
scheduled one, two workers). The ledger makes scoring *exactly once* per input content: before
scoring a batch a run **claims** it in one SQLite transaction, and it scores only what it
claimed; when the selections file is written it marks the claim **done** (with the selections
path and the batch's summary), or **failed** (with the reason, so that the next run retries).

- The key is the input file's content (SHA-256) and, when ``rescore_on_new_bundle`` is asked
  for, the bundle version; by default a content done with *any* bundle version is not scored
  again (rescoring an inbox after a new calibration is an explicit choice).
- A claim held by a live run is skipped by the others; one whose owner died (a process that is
  gone on this host, or a lease that expired) is taken over. A run that dies after writing the
  selections file but before marking it done makes the next run score the batch again, which
  rewrites the same file with the same bytes.
- Hashing is cached on each file's ``(size, mtime_ns, inode, ctime_ns)``, so a run with nothing
  new stats the inbox and reads nothing: its cost does not grow with the content already done.
- The finished rows are the pipeline's history (:meth:`Ledger.history`): rejection rate and
  drift per batch and run over time, for the trend chart of the scoring report.

The database is ``<output_dir>/.seapig-ledger.sqlite`` (hidden, so inbox and output readers
ignore it), in SQLite's default rollback-journal mode with a busy timeout. SQLite's locking
needs a local file system (or one with working POSIX locks); do not put ``output_dir`` on NFS
shared by several hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from seapig_core._io import ensure_writable_dir, file_sha256, loads_json

__all__ = ["LEDGER_NAME", "Claim", "Ledger", "LedgerEntry"]

LEDGER_NAME = ".seapig-ledger.sqlite"
_SCHEMA_VERSION = 1
_DEFAULT_LEASE_SECONDS = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    content_sha256 TEXT NOT NULL,
    bundle_version TEXT NOT NULL,
    batch TEXT NOT NULL,
    input_path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('claimed', 'done', 'failed')),
    owner TEXT NOT NULL,
    run_id TEXT,
    deployment TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    finished_at REAL,
    selections_path TEXT,
    archived_path TEXT,
    summary TEXT,
    error TEXT,
    PRIMARY KEY (content_sha256, bundle_version)
);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (finished_at);
"""


def _owner() -> str:
    """This process as a claim owner: the owned-temporary tag (host, boot, pid, start time)."""
    from seapig_core._io import _owner as io_owner

    return io_owner()


def _owner_is_alive(owner: str) -> bool | None:
    """True/False for an owner on this host and boot; None when it cannot be checked (another host)."""
    from seapig_core._io import _host_and_boot, _process_start

    try:
        host, boot, pid, start = owner.split("-")
    except ValueError:
        return None
    if (host, boot) != _host_and_boot():
        return False if host == _host_and_boot()[0] else None
    current = _process_start(int(pid))
    return current is not None and (current == 0 or int(start) == 0 or current == int(start))


@dataclass(frozen=True)
class Claim:
    """A batch this run claimed and must now score, then :meth:`Ledger.complete` or :meth:`Ledger.fail`."""

    batch: str
    input_path: str
    content_sha256: str
    bundle_version: str
    owner: str
    attempts: int


@dataclass(frozen=True)
class LedgerEntry:
    """A batch the ledger already knows: done (with its selections file) or held by another live run."""

    batch: str
    input_path: str
    content_sha256: str
    bundle_version: str
    state: str
    selections_path: str | None
    finished_at: float | None
    summary: dict[str, Any] | None


class Ledger:
    """The scoring ledger of one output directory (see the module docstring).

    Parameters
    ----------
    output_dir : str or Path
        The directory of the selections files; the ledger lives in it.
    lease_seconds : float
        How long a claim of a run on another host is honoured without news; a claim of a dead
        process on this host is taken over at once.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, lease_seconds: float = _DEFAULT_LEASE_SECONDS) -> None:
        if not (isinstance(lease_seconds, (int, float)) and lease_seconds > 0):
            raise ValueError(f"The 'lease_seconds' parameter must be a positive number. Got {lease_seconds!r} instead.")
        self.output_dir = ensure_writable_dir(output_dir, "output_dir")
        self.path = self.output_dir / LEDGER_NAME
        self.lease_seconds = float(lease_seconds)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise ValueError(
                    f"The ledger {str(self.path)!r} has schema version {row[0]}; this seapig_core reads "
                    f"version {_SCHEMA_VERSION}. Move it aside to start a new history."
                )

    def __repr__(self) -> str:
        return f"Ledger({str(self.output_dir)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise ValueError(f"The ledger {str(self.path)!r} could not be opened: {exc}.") from exc
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout = 60000")
            yield db
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"The ledger {str(self.path)!r} could not be used: {exc}.") from exc
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken before reading)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ content

    def fingerprints(self, paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
        """SHA-256 of each file's content by batch, hashing only files whose stat changed.

        Raises
        ------
        ValueError
            If a file cannot be read (named).
        """
        stats: dict[str, os.stat_result] = {}
        for batch, path in paths.items():
            try:
                stats[batch] = os.stat(path)
            except OSError as exc:
                raise ValueError(f"The input file {str(path)!r} of batch {batch!r} could not be read: {exc.strerror or exc}.") from exc
        with self._connect() as db:
            known = {
                row[0]: tuple(row)[1:]
                for row in db.execute("SELECT path, size, mtime_ns, inode, ctime_ns, sha256 FROM file_hashes")
            }
        result: dict[str, str] = {}
        fresh: list[tuple[str, int, int, int, int, str]] = []
        for batch, path in paths.items():
            key = str(Path(path).absolute())
            st = stats[batch]
            signature = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            cached = known.get(key)
            if cached is not None and tuple(cached)[:4] == signature:
                result[batch] = cached[4]
                continue
            try:
                digest = file_sha256(path)
            except OSError as exc:
                raise ValueError(f"The input file {str(path)!r} of batch {batch!r} could not be read: {exc.strerror or exc}.") from exc
            result[batch] = digest
            fresh.append((key, *signature, digest))
        if fresh:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?)", fresh)
        return result

    # ------------------------------------------------------------------ claims

    def claim(
        self,
        batches: Mapping[str, str | os.PathLike[str]],
        bundle_version: str,
        *,
        rescore_on_new_bundle: bool = False,
        run_id: str | None = None,
        deployment: str | None = None,
        fingerprints: Mapping[str, str] | None = None,
    ) -> tuple[list[Claim], list[LedgerEntry]]:
        """Claim the batches this run should score; return ``(claims, skipped)``.

        A batch is skipped when its content is done (with this bundle version when
        ``rescore_on_new_bundle``, with any otherwise) or claimed by another live run; every
        other batch (new, changed, failed before, or claimed by a dead run) is claimed for this
        run, in one transaction, so two overlapping runs never claim the same batch.

        Parameters
        ----------
        batches : mapping of str to path
            Batch name -> input file.
        bundle_version : str
            The version of the bundle this run scores with.
        rescore_on_new_bundle : bool
            Score again the contents done with another bundle version.
        run_id, deployment : str, optional
            Recorded with the claim (the history and the reports show them).
        fingerprints : mapping of str to str, optional
            Content hashes by batch, when already computed (:meth:`fingerprints`).
        """
        if not isinstance(bundle_version, str) or not bundle_version:
            raise ValueError(f"The 'bundle_version' parameter must be a non-empty str. Got {bundle_version!r} instead.")
        hashes = dict(fingerprints) if fingerprints is not None else self.fingerprints(batches)
        owner = _owner()
        now = time.time()
        claims: list[Claim] = []
        skipped: list[LedgerEntry] = []
        with self._transaction() as db:
            for batch, path in batches.items():
                content = hashes[batch]
                done = self._done_row(db, content, bundle_version, rescore_on_new_bundle)
                if done is not None:
                    skipped.append(self._entry(done))
                    continue
                row = db.execute(
                    "SELECT * FROM batches WHERE content_sha256 = ? AND bundle_version = ?", (content, bundle_version)
                ).fetchone()
                attempts = 0
                if row is not None:
                    if row["state"] == "claimed" and row["owner"] != owner and self._claim_is_live(row, now):
                        skipped.append(self._entry(row))
                        continue
                    attempts = int(row["attempts"])
                db.execute(
                    "INSERT OR REPLACE INTO batches (content_sha256, bundle_version, batch, input_path, state, owner, run_id, "
                    "deployment, attempts, claimed_at, lease_until) VALUES (?, ?, ?, ?, 'claimed', ?, ?, ?, ?, ?, ?)",
                    (content, bundle_version, batch, str(path), owner, run_id, deployment, attempts + 1, now, now + self.lease_seconds),
                )
                claims.append(Claim(batch, str(path), content, bundle_version, owner, attempts + 1))
        return claims, skipped

    def complete(
        self,
        claim: Claim,
        selections_path: str | os.PathLike[str],
        summary: Mapping[str, Any] | None = None,
        *,
        archived_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Mark a claimed batch done, with its selections file and its summary (JSON-serialisable).

        Raises
        ------
        ValueError
            If the claim is no longer this run's (it was taken over after its lease expired).
        """
        text = json.dumps(dict(summary or {}), sort_keys=True, allow_nan=False, default=str)
        with self._transaction() as db:
            self._check_still_mine(db, claim)
            db.execute(
                "UPDATE batches SET state = 'done', finished_at = ?, selections_path = ?, archived_path = ?, summary = ?, "
                "error = NULL WHERE content_sha256 = ? AND bundle_version = ?",
                (time.time(), str(selections_path), None if archived_path is None else str(archived_path), text,
                 claim.content_sha256, claim.bundle_version),
            )

    def fail(self, claim: Claim, reason: str) -> None:
        """Mark a claimed batch failed (the next run claims it again); a lost claim is ignored."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT owner, state FROM batches WHERE content_sha256 = ? AND bundle_version = ?",
                (claim.content_sha256, claim.bundle_version),
            ).fetchone()
            if row is None or row[0] != claim.owner or row[1] != "claimed":
                return
            db.execute(
                "UPDATE batches SET state = 'failed', finished_at = ?, error = ? WHERE content_sha256 = ? AND bundle_version = ?",
                (time.time(), str(reason)[:4000], claim.content_sha256, claim.bundle_version),
            )

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[LedgerEntry]:
        """Every batch the ledger knows, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM batches ORDER BY claimed_at").fetchall()
        return [self._entry(row) for row in rows]

    def history(self, limit: int = 200) -> pd.DataFrame:
        """The latest ``limit`` finished batches, oldest first: the pipeline's history for trend charts.

        Columns: ``finished_at`` (UTC timestamp), ``batch``, ``run_id``, ``deployment``,
        ``bundle_version``, ``state`` and, for done batches, every number of the batch's
        summary (e.g. ``samples``, ``rejection_rate``, ``expected_rejection_rate``,
        ``ks_statistic``, ``verdict``).
        """
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM batches WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (int(limit),)
            ).fetchall()
        records = []
        for row in reversed(rows):
            summary = self._summary(row["summary"])
            scalars = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}
            records.append({
                **scalars,
                "finished_at": pd.Timestamp(row["finished_at"], unit="s", tz="UTC"),
                "batch": row["batch"],
                "run_id": row["run_id"],
                "deployment": row["deployment"],
                "bundle_version": row["bundle_version"],
                "state": row["state"],
            })
        columns = ["finished_at", "batch", "run_id", "deployment", "bundle_version", "state"]
        frame = pd.DataFrame.from_records(records)
        return frame[columns + [c for c in frame.columns if c not in columns]] if records else pd.DataFrame(columns=columns)

    # ------------------------------------------------------------------ helpers

    def _claim_is_live(self, record: sqlite3.Row, now: float) -> bool:
        alive = _owner_is_alive(str(record["owner"]))
        if alive is False:
            return False
        return float(record["lease_until"]) > now

    def _done_row(self, db: sqlite3.Connection, content: str, version: str, rescore: bool) -> sqlite3.Row | None:
        if rescore:
            query, args = "SELECT * FROM batches WHERE content_sha256 = ? AND bundle_version = ? AND state = 'done'", (content, version)
        else:
            query, args = "SELECT * FROM batches WHERE content_sha256 = ? AND state = 'done' ORDER BY finished_at DESC", (content,)
        return db.execute(query, args).fetchone()

    def _check_still_mine(self, db: sqlite3.Connection, claim: Claim) -> None:
        row = db.execute(
            "SELECT owner, state FROM batches WHERE content_sha256 = ? AND bundle_version = ?",
            (claim.content_sha256, claim.bundle_version),
        ).fetchone()
        if row is None or row[0] != claim.owner or row[1] != "claimed":
            raise ValueError(
                f"The claim on batch {claim.batch!r} ({claim.input_path!r}) is no longer this run's: another run "
                f"took it over (its lease of {self.lease_seconds:g} s expired). Its selections were written twice."
            )

    def _summary(self, text: str | None) -> dict[str, Any] | None:
        if not text:
            return None
        value = loads_json(text, f"a summary in the ledger {str(self.path)!r}")
        return value if isinstance(value, dict) else None

    def _entry(self, record: sqlite3.Row) -> LedgerEntry:
        return LedgerEntry(
            batch=record["batch"],
            input_path=record["input_path"],
            content_sha256=record["content_sha256"],
            bundle_version=record["bundle_version"],
            state=record["state"],
            selections_path=record["selections_path"],
            finished_at=record["finished_at"],
            summary=self._summary(record["summary"]),
        )

