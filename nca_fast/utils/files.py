"""Files in and out.

Every output is written into a private temporary folder beside its target (``mkdtemp``: a random
name, created exclusively, mode 0700, so nobody else can plant a symlink in it) and renamed over the
target only once complete: a crash, Ctrl-C, SIGTERM or SIGHUP leaves the old file and no temporary
one. A writer killed outright (SIGKILL, out of memory) cannot unwind: its folder is named after the
host and process, and the next write of the same file deletes it once that process is gone. Every
input is read from a regular file of bounded size: devices, FIFOs, folders and oversized files are
refused before a byte is read.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence, Type

MiB = 1 << 20
MAX_MODEL_BYTES = 256 * MiB  # model and decoder files (the largest published model is 0.5 MB)
MAX_IMAGE_BYTES = 256 * MiB  # image files


class InputFileError(ValueError):
    """An input file that cannot be read as what it should be; the message names the file."""

    def __init__(self, path, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ("an image file", "a model file")."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path, *, limit: int, what: str, error: Type[InputFileError] = InputFileError) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file of at most ``limit`` bytes.

    Symlinks are followed (a loop is reported as a loop); a FIFO is opened without blocking and
    refused, as are devices, sockets and folders. ``what`` names the file in messages ("model file").
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(path, "symlink loop") from None
        if e.errno == errno.EISDIR:
            raise error(path, f"is a directory, not {_a(what)}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(path, f"is {_kind(st.st_mode)}, not {_a(what)}")
        if st.st_size > limit:
            raise error(path, f"is {_size(st.st_size)}, more than the {_size(limit)} {_a(what)} may have")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path, *, limit: int, what: str, error: Type[InputFileError] = InputFileError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_input`)."""
    with open_input(path, limit=limit, what=what, error=error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since it was opened
        raise error(path, f"is more than the {_size(limit)} a {what} may have")
    return data


def check_output(path, suffixes: Sequence[str], what: str = "output") -> Path:
    """Check an output path before any work: a known suffix, an existing writable folder, not a
    folder itself. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(path)!r}: unknown extension {path.suffix or '(none)'!r}; "
                         f"use {', '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder does not exist: {folder}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to the {what} folder {folder}")
    return path


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file (by inode when both exist, else by resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Interrupted(SystemExit):
    """SIGTERM or SIGHUP during a write: unwinds like Ctrl-C so that temporary files go."""


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def raise_(signum, frame):
        raise _Interrupted(128 + signum)
    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, raise_) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _partial_prefix(path: Path) -> str:
    """The start of the temporary folders' names for ``path``: ``.NAME.HOST.`` and then the writer's
    process id (so that a later write can tell a dead writer's folder from a live one's)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64] or "host"
    return f".{path.name}.{host}."


def _remove_orphans(path: Path) -> None:
    """Delete the temporary folders of earlier writes of ``path`` on this host whose process is gone
    (SIGKILL, out of memory, a power cut: nothing could unwind them). Never another host's (their
    process ids mean nothing here) nor a live process's."""
    prefix = _partial_prefix(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".partial")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # (someone else's process, or unknowable: kept)
    return True


@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """A temporary path with ``path``'s name (so writers that go by the extension work) inside a
    private folder beside ``path``; on success it replaces ``path`` with the usual permissions
    (0666 less the umask), otherwise nothing is left behind."""
    path = Path(path)
    if not path.parent.is_dir():  # (mkdtemp's error would name the temporary folder)
        raise FileNotFoundError(f"the folder of {path} does not exist: {path.parent}")
    if path.is_dir():  # (os.replace's error would too)
        raise IsADirectoryError(f"{path} is a folder: give a file name to write")
    _remove_orphans(path)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(path)}{os.getpid()}.", suffix=".partial",
                                   dir=path.parent))
    tmp = tmpdir / path.name
    try:
        with _signals_unwind():
            yield tmp
            if not tmp.is_file():
                raise RuntimeError(f"nothing was written for {path}")
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent, directory=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
