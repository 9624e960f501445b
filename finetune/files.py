"""Safe writes in folders other people (or other runs) may share; reads that fail with one line.

Writers: every file is written to a *new* temporary name next to its destination, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so an existing file or a symlink planted under that name is never
opened, never followed, never truncated), fsync'ed, then renamed over the destination with
``os.replace`` (which replaces a symlink at the destination itself, not its target). A failed write
(disk full, I/O error, permission) removes its temporary file and re-raises the ``OSError``; the
destination keeps its old content. Temporary directories are made the same way with ``os.mkdir``
(which fails on any existing name, symlinks included).

Readers: ``read_text`` / ``read_json`` turn missing files, decode and parse errors into one
``UserError`` line naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import UserError

TMP_PREFIX = ".tmp-"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` atomically, through an exclusively created temporary file."""
    path = Path(path)
    for _ in range(16):
        tmp = _tmp_name(path)
        try:
            fd = os.open(tmp, _FLAGS, 0o666)  # umask applies, as for any file the user creates
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover -- 16 collisions of 32 random bits
        raise FileExistsError(errno.EEXIST, "cannot create a unique temporary file", str(path))
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_path(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), durable)


def make_temp_dir(parent: Path, stem: str) -> Path:
    """A new, empty directory ``parent/.tmp-<stem>.<pid>.<random>`` that nobody else can have made."""
    for _ in range(16):
        path = parent / f"{TMP_PREFIX}{stem}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "cannot create a unique temporary directory", str(parent))


def remove_path(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree; missing is fine."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def describe_os_error(e: OSError) -> str:
    """``No space left on device`` etc., without the traceback-style repr."""
    if e.errno == errno.ENOSPC:
        return "the disk is full (No space left on device)"
    if e.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    return e.strerror or str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------------
# readers


def read_text(path: str | os.PathLike, what: str = "file", fix: str = "") -> str:
    """The file's UTF-8 text, or one ``UserError`` line (missing, unreadable, not UTF-8)."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist{hint}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file{hint}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {describe_os_error(e)}{hint}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}){hint}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", *, fix: str = "",
              expect: type | None = dict) -> Any:
    """Parsed JSON (``NaN``/``Infinity`` refused: they are not JSON), or one ``UserError`` line."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    text = read_text(path, what, fix)

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        value = json.loads(text, parse_constant=no_constants)
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON ({' '.join(str(e).split())}){hint}") from None
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{what} {path} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                        f"got {type(value).__name__}{hint}")
    return value


def check_writable_dir(path: Path, what: str) -> None:
    """Fail now (one line) if ``path`` cannot become a writable directory: before minutes of model loading.

    Creates the directory (and parents) if needed, then creates and removes a probe file in it.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what} {path} exists and is not a directory; choose another {what}") from None
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {describe_os_error(e)}; choose a writable "
                        f"{what}") from None
    probe = _tmp_name(path / "write-probe")
    try:
        os.close(os.open(probe, _FLAGS, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({describe_os_error(e)}); choose a writable "
                        f"{what} or fix its permissions") from None


def guarded(action: Callable[[], Any], what: str, fix: str) -> Any:
    """Run ``action``; an ``OSError`` becomes one ``UserError`` line ("could not <what>: <why>; <fix>")."""
    try:
        return action()
    except OSError as e:
        raise UserError(f"could not {what}: {describe_os_error(e)}; {fix}") from None
