"""Atomic file writes: a temporary file in the same folder, then os.replace, so a crash,
Ctrl-C or kill never leaves a truncated file behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tumorseg.errors import TumorsegError


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, then move it into place.

    The file gets the permissions an ordinary `open()` would give it (0666 minus umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # os.open applies the umask itself, unlike mkstemp's fixed 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Check, before any long work starts and without creating anything, that the output
    folder `path` exists as a writable folder or can be made.

    Raises:
        TumorsegError: the path is a file, lies under a file, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TumorsegError(f"output {path} is a file; pass a folder to --out")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise TumorsegError(f"cannot write to output folder {path} ({existing} is a file); choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TumorsegError(f"cannot write to output folder {path} (no permission in {existing}); "
                            "choose another --out")
    return path


def prepare_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder `path` (and its parents) when results are about to be written.

    Raises:
        TumorsegError: the path is a file, or the folder cannot be created or written.
    """
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TumorsegError(f"cannot write to output folder {path} ({e.strerror or e}); "
                            "choose another --out") from e
    return path


@contextmanager
def undo_on_failure(folder: Path, files: Sequence[str], kept: Callable[[], bool]) -> Iterator[None]:
    """On an exception in the block, unless `kept()` says results worth keeping exist,
    remove what the block made: those of `files` in `folder` that did not exist before,
    and `folder` and its parents if the block created them and they are empty again."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    own = [folder / name for name in files if not (folder / name).exists()]
    try:
        yield
    except BaseException:
        if not kept():
            for path in own:
                path.unlink(missing_ok=True)
            for directory in made:
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
        raise
