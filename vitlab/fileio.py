"""Files in and out safely. Outputs: never overwrite without being asked, never replace anything but
a regular file, never leave half a file, and say what is wrong with an output path before the work
that would fill it starts. Inputs: a regular file or one clear error (a FIFO would block the read,
``/dev/zero`` never end it)."""
from __future__ import annotations

import errno
import os
import secrets
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import VitlabError, path_label

# The temporary file is named after the output; keep that part short so that an output whose own
# name is near the file system's limit (255 bytes) still gets a temporary name that fits.
_TEMP_NAME_BYTES = 64


def check_input(path: str | os.PathLike, what: str, error: type[VitlabError] = VitlabError) -> Path:
    """``path`` if it is a regular file to read; else ``error`` in one line: ``{what} not found``, a
    directory, or not a regular file (a FIFO, device or socket), decided by ``stat`` alone."""
    path = Path(path)
    label = path_label(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {label} (no such file)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {label}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{label} is a directory; give the {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{label} is not a regular file (a FIFO, device or socket); give the {what} file")
    return path


def check_output(path: str | os.PathLike, force: bool = False, force_hint: str = "--force") -> Path:
    """Refuse, before any work, an output path that cannot be written: an existing file without
    ``force``, a directory, a missing folder, a folder that is a file or is not writable, a name
    too long. Commands call it up front; ``atomic_write`` calls it again. ``force_hint`` is how
    the caller asks for ``force`` (``--force`` on the command line, ``force=True`` in Python).

    Raises:
        VitlabError: one line naming the path and what to change.
    """
    path = Path(path)
    label = path_label(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise VitlabError(_stat_problem(path, exc)) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise VitlabError(f"{label} is a directory; give the name of a file to write")
    if st is not None and not stat.S_ISREG(st.st_mode):  # /dev/null, a FIFO: --force must not replace them
        raise VitlabError(f"{label} is not a regular file (a device, FIFO or socket); vitlab replaces "
                          "regular files only, even with --force")
    if st is not None and not force:
        raise VitlabError(f"{label} already exists; pass {force_hint} to overwrite it")
    parent = path.parent
    if not os.path.isdir(parent):
        raise VitlabError(f"cannot write {label}: folder {path_label(parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VitlabError(f"cannot write {label}: folder {path_label(parent)} is not writable")
    return path


# the old name, kept for the commands that call it
check_writable = check_output


def _stat_problem(path: Path, exc: OSError) -> str:
    label = path_label(path)
    if exc.errno == errno.ENAMETOOLONG:
        return f"cannot write {label}: a name in it is too long for the file system (usually at most 255 bytes)"
    if exc.errno == errno.ENOTDIR:
        blocker = next((p for p in path.parents if os.path.lexists(p) and not os.path.isdir(p)), path.parent)
        return f"cannot write {label}: {path_label(blocker)} is a file, not a folder"
    return f"cannot write {label}: {exc.strerror or exc}"


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None], force: bool = False,
                 force_hint: str = "--force") -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to a temporary file
    beside ``path`` and rename it into place, so an interrupted run leaves the old file intact.

    The file gets the permissions of an ordinary new file (0666 less the umask). The temporary
    file is removed on an exception, Ctrl-C or SIGTERM.
    """
    path = check_output(path, force, force_hint)
    try:
        tmp, fd = _create_temp(path)
    except OSError as exc:
        raise VitlabError(f"cannot write {path_label(path)}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode & 0o777  # what the umask left of 0666
    try:
        with _removed_on_sigterm(tmp):
            _fill(tmp, fd, data)
            os.chmod(tmp, mode)  # a writer that recreated the file may have left other permissions
            _place(tmp, path, force, force_hint)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise VitlabError(f"cannot write {path_label(path)}: {exc.strerror or exc}") from None
        raise
    return path


def _place(tmp: Path, path: Path, force: bool, force_hint: str) -> None:
    """Give ``tmp`` its final name. Without ``force`` the name is created exclusively (a hard link
    fails if anything appeared there during the write), so nothing is replaced unasked; with it,
    only a regular file is replaced."""
    if force:
        check_output(path, force=True)  # it may have become a FIFO or device meanwhile
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise VitlabError(f"{path_label(path)} appeared while it was being written; pass {force_hint} to "
                          "overwrite it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (some network and FUSE file systems): the last check is as late as can be
        check_output(path, False, force_hint)
        os.replace(tmp, path)
        return
    tmp.unlink()


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new file beside ``path``, opened with mode 0666 for the OS to narrow by the umask (mkstemp
    would make it 0600, hiding the output from everyone else). Same suffix: writers such as
    ``savefig`` pick the format from it."""
    short = os.fsdecode(os.fsencode(path.name)[:_TEMP_NAME_BYTES])
    suffix = path.suffix if 0 < len(path.suffix) <= 16 else ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):  # a clash of 32 random bits is rare; a hundred in a row is not chance
        tmp = path.parent / f".{short}.{secrets.token_hex(4)}{suffix}"
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _fill(tmp: Path, fd: int, data: str | bytes | Callable[[Path], None]) -> None:
    with os.fdopen(fd, "wb") as fh:
        if isinstance(data, str):
            fh.write(data.encode("utf-8"))
        elif isinstance(data, bytes):
            fh.write(data)
    if callable(data):
        data(tmp)


@contextmanager
def _removed_on_sigterm(tmp: Path) -> Iterator[None]:
    """SIGTERM (a scheduler's kill, ``timeout``) ends Python without unwinding, so no ``finally``
    would remove the temporary file. While it exists, SIGTERM removes it and exits with 143 (128 +
    15, what the shell reports for a process killed by SIGTERM). Only the default action is
    replaced: a program that ignores or handles SIGTERM itself keeps its choice."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # Python runs signal handlers in the main thread only
        return

    def on_sigterm(signum, frame):
        tmp.unlink(missing_ok=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
