"""Atomic file writes that a planted symlink cannot redirect.

A file is written under a fresh temporary name in its destination directory, then
renamed over the destination, so a reader never sees half a file. The temporary
file is created exclusively (``O_EXCL``), without following a symlink
(``O_NOFOLLOW``), under an unpredictable name, and every step — create, rename,
clean-up — is relative to a descriptor of the directory opened first: a symlink
planted at the temporary name, or the directory swapped for a symlink meanwhile,
changes nothing. With ``root``, the directories below ``root`` are opened one at a
time without following symlinks, so the file cannot land outside ``root`` whatever
was checked about its path before. POSIX only (``dir_fd``).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .errors import ValidationError

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Write errors that name no file but are about the one being written (disk or quota full).
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Longest part of the destination's name kept in a temporary name (NAME_MAX is 255 bytes).
_MAX_TEMPORARY_STEM = 200


def open_directory(directory: Path, *, root: Path | None = None) -> int:
    """A descriptor of ``directory``, created (with its parents) when missing.

    With ``root``, ``directory`` must lie under it: ``root`` is opened as configured,
    then each component below it without following symlinks; a component that is a
    symlink (or not a directory) raises :class:`~sessionq.models.errors.ValidationError`.
    """
    if root is None:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory, _DIRECTORY_FLAGS)
    try:
        parts = directory.relative_to(root).parts
    except ValueError:
        raise ValidationError(f"{directory} is outside {root}") from None
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIRECTORY_FLAGS)
    try:
        for part in parts:
            if part in (".", ".."):
                raise ValidationError(f"{directory} must not contain {part!r}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            try:
                child = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except PermissionError:
                raise
            except OSError as exc:  # a symlink: ENOTDIR (Linux), ELOOP or EMLINK (BSDs); ENOENT if removed meanwhile
                raise ValidationError(f"{directory}: {part!r} is a symlink or not a directory") from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_temporary(name: str, dir_fd: int) -> tuple[str, int]:
    """Create a new, empty file ``.NAME.RANDOM.tmp`` in the directory; return its name and descriptor."""
    while True:
        temporary = f".{name[:_MAX_TEMPORARY_STEM]}.{secrets.token_hex(8)}.tmp"
        try:
            return temporary, os.open(temporary, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_text_file(path: Path, *, root: Path | None = None, compress: bool = False) -> Iterator[TextIO]:
    """Write UTF-8 text (gzip-compressed with ``compress``) that replaces ``path`` when the block ends.

    If the block raises, ``path`` is left as it was and the temporary file is removed.
    ``root`` confines the write to a directory tree (see :func:`open_directory`).
    """
    dir_fd = open_directory(path.parent, root=root)
    try:
        _refuse_special(path, dir_fd)
        try:
            temporary, fd = _create_temporary(path.name, dir_fd)
        except OSError as exc:
            raise _about(exc, path) from None
        try:
            with os.fdopen(fd, "wb") as raw:
                layer = gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw) if compress else raw
                text = io.TextIOWrapper(layer, encoding="utf-8", newline="\n")
                try:
                    yield text
                finally:
                    text.detach()  # flushes, and leaves the file to the ``with`` above
                    if compress:
                        layer.close()  # writes the gzip trailer; ``raw`` stays open
            os.replace(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=dir_fd)
            if isinstance(exc, OSError) and (temporary in (exc.filename, exc.filename2) or exc.errno in _FULL):
                raise _about(exc, path) from None
            raise
    finally:
        os.close(dir_fd)


def _about(exc: OSError, path: Path) -> OSError:
    """The same error about the user's ``path``, not the temporary name they never chose."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def _refuse_special(path: Path, dir_fd: int) -> None:
    """Raise :class:`~sessionq.models.errors.ValidationError` if ``path`` is a device, a
    pipe, a socket or a directory: the rename would replace it (``-o /dev/null``, as root,
    would turn the device into a file). A symlink is replaced, never followed."""
    try:
        mode = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise ValidationError(f"{path} is not a regular file: write to a file instead")
