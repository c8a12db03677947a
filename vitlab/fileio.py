"""Writing output files safely: never overwrite without being asked, never leave half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import VitlabError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing file unless ``force``; refuse a missing parent folder."""
    path = Path(path)
    if path.exists() and not force:
        raise VitlabError(f"{path} already exists; pass --force to overwrite it")
    if path.is_dir():
        raise VitlabError(f"{path} is a directory, not a file")
    if not path.parent.exists():
        raise VitlabError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None], force: bool = False) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to a temporary file
    beside ``path`` and rename it into place, so an interrupted run leaves the old file intact."""
    path = check_writable(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                fh.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
