"""File-system primitives shared by every writer in the library.

One place for the rules that make files trustworthy:

- writes are atomic: data goes to a temporary file in the destination directory, is flushed
  to disk, then renamed over the destination, so a killed run never leaves a half-written
  file under the final name;
- temporary files and directories are *owned*: their names carry the writer's host, boot and
  process (:func:`temporary_name`), so that the next write in a directory removes those of
  dead writers (:func:`sweep_stale_temporaries`) and never those of a live one;
- names stay inside their directory: a user-supplied file stem may not contain a path
  separator or ``..``, and a path that resolves (through symlinks) outside its root is
  refused (:func:`resolve_inside`);
- JSON from disk is parsed with bounded size and nesting depth (:func:`read_json`), and a
  problem names the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "JSON_MAX_BYTES",
    "JSON_MAX_DEPTH",
    "STALE_FOREIGN_SECONDS",
    "MappedFileHash",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_file_stem",
    "ensure_writable_dir",
    "file_sha256",
    "file_xxh3_128",
    "header_problem",
    "is_temporary_name",
    "loads_json",
    "read_json",
    "read_json_object",
    "resolve_inside",
    "sweep_stale_temporaries",
    "temporary_name",
]

_FINGERPRINT_PIECE = 1 << 20  # 1 MiB: stays in the CPU's cache between the read and the hash
_HASH_CHUNK = 1 << 22  # 4 MiB: large enough to stream at disk speed, small enough to stay bounded


def ensure_writable_dir(path: str | os.PathLike[str], name: str = "outdir") -> Path:
    """Create ``path`` if needed and check that files can be created in it.

    Parameters
    ----------
    path : str or os.PathLike
        The directory.
    name : str
        The argument name used in error messages.

    Returns
    -------
    pathlib.Path
        The directory as a ``Path``.

    Raises
    ------
    ValueError
        If the path exists and is not a directory, or cannot be created or written.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"The '{name}' parameter must be a directory. Got the file {str(directory)!r} instead.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # The only reliable test of writability is to write (an owned name: a kill between
        # creating and removing it leaves a file the next sweep removes).
        probe = directory / temporary_name("probe")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(
            f"The '{name}' parameter must be a writable directory. "
            f"Could not write to {str(directory)!r}: {exc.strerror or exc}."
        ) from exc
    return directory


def check_file_stem(stem: str, name: str = "prefix") -> str:
    """Validate a user-supplied file-name stem so that it names a file inside its directory.

    Raises
    ------
    TypeError
        If ``stem`` is not a string.
    ValueError
        If ``stem`` is empty, contains a path separator, a NUL byte, or is ``.``/``..``.
    """
    if not isinstance(stem, str):
        raise TypeError(f"The '{name}' parameter must be a str. Got {type(stem).__name__} instead.")
    bad = (
        not stem
        or stem in {".", ".."}
        or ".." in stem
        or "/" in stem
        or "\\" in stem
        or "\x00" in stem
        or (os.altsep is not None and os.altsep in stem)
    )
    if bad:
        raise ValueError(
            f"The '{name}' parameter must be a plain file-name stem without path separators or '..'. "
            f"Got {stem!r} instead."
        )
    return stem


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; move it into place on success.

    The caller writes the whole file to the yielded path. If the block raises, the temporary
    file is removed and ``destination`` is left as it was (absent or the previous version).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (d / "x.txt").read_text()
    'done'
    """
    destination = Path(destination)
    sweep_stale_temporaries(destination.parent)
    tmp = destination.parent / temporary_name(destination.name)
    # Created exclusively, with the permissions open() would give (0666 & ~umask), so that a
    # reviewer can read what a worker wrote.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, destination)
        _fsync_dir(destination.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(destination: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON to ``destination`` atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(destination, (text + "\n").encode("utf-8"))


#: Largest JSON document read from disk (manifests, metadata): 64 MiB.
JSON_MAX_BYTES = 64 << 20
#: Deepest nesting of arrays and objects accepted in a JSON document from disk.
JSON_MAX_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN_CLOSE = np.zeros(256, dtype=np.int8)
_OPEN_CLOSE[[ord("["), ord("{")]] = 1
_OPEN_CLOSE[[ord("]"), ord("}")]] = -1


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (linear time, no recursion)."""
    structure = _JSON_STRING.sub(b"", raw)
    if not structure:
        return 0
    steps = _OPEN_CLOSE[np.frombuffer(structure, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the non-standard JSON constant {name} is not allowed")


def loads_json(
    raw: bytes | str, what: str = "JSON", *, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH
) -> Any:
    """Parse untrusted JSON with bounded size and nesting depth.

    Parameters
    ----------
    raw : bytes or str
        The document (UTF-8 when bytes).
    what : str
        What the document is, for error messages (e.g. ``"'/data/b.json'"``).
    max_bytes, max_depth : int
        Limits; a document beyond either is refused before it is parsed.

    Raises
    ------
    ValueError
        Naming ``what``: too large, nested too deeply, not UTF-8, not JSON, or holding
        ``NaN``/``Infinity``. Never ``RecursionError`` or ``MemoryError``.
    """
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data):,} bytes of JSON; at most {max_bytes:,} are read.")
    depth = _json_depth(data)
    if depth > max_depth:
        raise ValueError(f"{what} nests JSON {depth} levels deep; at most {max_depth} are read.")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text: {exc}") from exc
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from exc


def read_json(
    path: str | os.PathLike[str], *, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH
) -> Any:
    """Read a JSON file (never a pickle) with bounded size and depth (see :func:`loads_json`).

    Raises
    ------
    ValueError
        Naming the file: unreadable, too large, too deep, or not JSON.
    """
    path = Path(path)
    what = repr(str(path))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{what} is {size:,} bytes of JSON; at most {max_bytes:,} are read.")
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} could not be read: {exc.strerror or exc}.") from exc
    return loads_json(raw, what, max_bytes=max_bytes, max_depth=max_depth)


def read_json_object(path: str | os.PathLike[str], what: str = "file") -> dict[str, Any]:
    """:func:`read_json` for documents that must be a JSON object (manifests, metadata).

    Raises
    ------
    ValueError
        As :func:`read_json`, or when the document is not an object (e.g. a list).
    """
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"The {what} {str(path)!r} must hold a JSON object. Got a JSON {type(value).__name__} instead.")
    return value


def resolve_inside(path: str | os.PathLike[str], root: str | os.PathLike[str], name: str = "path") -> Path:
    """``path`` resolved (symlinks followed), refused unless it lies inside ``root`` (also resolved).

    Raises
    ------
    ValueError
        If the resolved path is outside the resolved root, e.g. a symlink in an inbox that
        points elsewhere.
    """
    resolved_root = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise ValueError(
            f"The '{name}' parameter {str(path)!r} resolves to {str(resolved)!r}, outside {str(resolved_root)!r}. "
            f"Files (and symlinks) must stay inside their directory."
        )
    return resolved


# ----------------------------------------------------------------------------- owned temporaries

#: Temporaries of writers on *other* hosts (whose liveness cannot be checked) are removed
#: after this many seconds without modification.
STALE_FOREIGN_SECONDS = 24 * 3600
_TEMP_MARK = ".seapig-tmp-"
# ".<stem>.seapig-tmp-<host8>-<boot8>-<pid>-<start>-<rand8><suffix>"
_TEMP_NAME = re.compile(
    r"\..*\.seapig-tmp-(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}"
)


@functools.lru_cache(maxsize=1)
def _host_and_boot() -> tuple[str, str]:
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    boot = "0" * 8
    with contextlib.suppress(OSError):
        boot = hashlib.sha256(Path("/proc/sys/kernel/random/boot_id").read_bytes()).hexdigest()[:8]
    return host, boot


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), 0 elsewhere, None if absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():  # no procfs: fall back to a signal-0 probe
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return 0
            return 0
        return None
    except OSError:
        return 0
    # Field 22 (starttime) after the parenthesised command name, which may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner() -> str:
    host, boot = _host_and_boot()
    pid = os.getpid()
    return f"{host}-{boot}-{pid}-{_process_start(pid) or 0}"


def temporary_name(stem: str, suffix: str = "") -> str:
    """A hidden, owned name for a temporary file or directory: ``.<stem>.seapig-tmp-<owner>-<random><suffix>``.

    The owner part names this host, its boot and this process (with its start time, so a
    reused PID is not mistaken for the writer). :func:`sweep_stale_temporaries` removes a
    temporary only when its owner is gone. Readers ignore hidden files.
    """
    return f".{stem}{_TEMP_MARK}{_owner()}-{secrets.token_hex(4)}{suffix}"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` was made by :func:`temporary_name`."""
    return _TEMP_NAME.match(name) is not None


def _owner_is_gone(match: re.Match[str], path: Path, now: float, foreign_after: float) -> bool:
    host, boot = _host_and_boot()
    if match["host"] != host:
        try:
            return now - path.lstat().st_mtime > foreign_after
        except FileNotFoundError:
            return False
    if match["boot"] != boot:
        return True  # written before this host's last reboot: its writer is dead
    start = _process_start(int(match["pid"]))
    return start is None or (start != 0 and int(match["start"]) != 0 and start != int(match["start"]))


def sweep_stale_temporaries(
    directory: str | os.PathLike[str], *, foreign_after: float = STALE_FOREIGN_SECONDS
) -> list[Path]:
    """Remove the temporary files and directories of dead writers in ``directory``.

    Writers call this before they write into a directory, so a writer killed mid-write
    (``kill -9``, a lost machine) leaves its temporary files only until the next write there.
    A temporary of a live process on this host is never touched; one from another host is
    removed once unmodified for ``foreign_after`` seconds.

    Returns
    -------
    list of pathlib.Path
        What was removed (best effort: entries that vanish or resist removal are skipped).
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name) if entry.name.startswith(".") else None
        if match is None:
            continue
        path = Path(entry.path)
        if not _owner_is_gone(match, path, now, foreign_after):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def file_xxh3_128(path: str | os.PathLike[str]) -> str:
    """Hex xxh3-128 of a file's bytes: a fast, non-cryptographic content fingerprint.

    For provenance only (which bytes a result came from), never where someone could gain by a
    crafted collision: the scoring ledger and the caches key on SHA-256. It runs at memory
    speed: about 0.25 s for a 1.6 GB file here, where :func:`file_sha256` takes 1.2 s. Read in
    1 MiB pieces into one reused buffer that stays in the CPU's cache (faster here than a memory
    map's page faults, and a file truncated meanwhile cannot crash the process).
    """
    import xxhash

    digest = xxhash.xxh3_128()
    buffer = bytearray(_FINGERPRINT_PIECE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


class MappedFileHash:
    """:func:`file_xxh3_128` of a memory-mapped file, hashed in file order as a reader reads it.

    A reader that maps a whole file calls :meth:`advance` with the end of each byte range it is
    about to read: the bytes up to there are hashed then, through the same mapping, so their
    pages are faulted in once (for the hash, and then the reader finds them mapped) and the
    file is not read a second time. :meth:`hexdigest` hashes whatever was not read. The digest
    is that of every mapped byte in file order, whatever the calls: ``advance`` never goes
    back, so a range read twice or out of order is hashed once, in its place. It is the
    fingerprint of the bytes actually read, even if the file changes on disk meanwhile.

    Parameters
    ----------
    mapping : buffer
        The whole file, mapped (an ``mmap.mmap`` or a ``uint8`` NumPy memmap from offset 0).

    Examples
    --------
    >>> import mmap, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = path.write_bytes(bytes(range(256)) * 10)
    >>> with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
    ...     hasher = MappedFileHash(mapped)
    ...     hasher.advance(1000)  # a reader is about to read bytes [0, 1000)
    ...     digest = hasher.hexdigest()
    ...     hasher.release()
    >>> digest == file_xxh3_128(path)
    True
    """

    def __init__(self, mapping: Any) -> None:
        import xxhash

        self._view = memoryview(mapping).cast("B")
        self._done = 0
        self._digest = xxhash.xxh3_128()

    def advance(self, end: int) -> None:
        """Hash every byte before ``end`` not hashed yet (a reader is about to read up to there)."""
        end = min(int(end), len(self._view))
        if end > self._done:
            self._digest.update(self._view[self._done : end])
            self._done = end

    def hexdigest(self) -> str:
        """Hash the rest of the file; the hex xxh3-128 of all its bytes (:func:`file_xxh3_128`)."""
        self.advance(len(self._view))
        return self._digest.hexdigest()

    def release(self) -> None:
        """Let go of the mapping (before it is closed)."""
        self._view.release()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, streamed in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def header_problem(header: Any, expected_format: str, schema_version: int) -> str | None:
    """Why ``header`` (a file's parsed JSON metadata) is not ``expected_format`` at ``schema_version``.

    Every file the library writes carries ``format``, ``schema_version`` and ``library_version``
    in its metadata; readers call this one check and wrap the answer in their own error.

    Returns
    -------
    str or None
        None when the header matches; otherwise a phrase for an error message.
    """
    from seapig_core._version import __version__

    if not isinstance(header, dict) or header.get("format") != expected_format:
        return f"it has no '{expected_format}' format header"
    version = header.get("schema_version")
    if version != schema_version:
        return (
            f"it has schema version {version!r} (written by seapig_core {header.get('library_version')!r}); "
            f"this seapig_core {__version__} reads schema version {schema_version}"
        )
    return None



def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/file system.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
