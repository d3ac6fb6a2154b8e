"""File-system primitives shared by every writer in the library.

One place for the two rules that make files trustworthy:

- writes are atomic: data goes to a temporary file in the destination directory, is flushed
  to disk, then renamed over the destination, so a killed run never leaves a half-written
  file under the final name;
- names stay inside their directory: a user-supplied file stem may not contain a path
  separator or ``..``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "header_problem",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_file_stem",
    "ensure_writable_dir",
    "file_sha256",
    "read_json",
]

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
        # The only reliable test of writability is to write.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".seapig-probe-"):
            pass
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
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates mode 0600; give the file the permissions open() would (0666 & ~umask),
    # so a reviewer can read what a worker wrote.
    os.chmod(tmp, 0o666 & ~_current_umask())
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


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file (never a pickle)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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


def _current_umask() -> int:
    # Linux reports the umask without changing it (setting it would race with other threads).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only portable way to read it is to set it
    os.umask(mask)
    return mask


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
