"""One process owns a run folder: ``<output_dir>/.lock`` holds its pid, and an OS lock on that file.

Why an OS lock (``fcntl.flock``) and not just "the file exists": the kernel drops the lock when its
holder dies in any way (SIGKILL, OOM killer, power loss on a local disk), so a lock left by a dead run
is stale by construction and the next run simply takes it; there is no pid-reuse guessing. The pid,
host and start time written into the file are only for the message a second run prints ("in use by
pid 1234 on host a, since ..."). On filesystems without ``flock`` support the lock falls back to the
pid: a lock whose pid is not alive on this host is stale.

The lock file is left in place when the run ends (removing it would race with a process that has
just opened it); an unlocked ``.lock`` means nothing. ``release`` removes the run folder again if the
lock created it and nothing else was written (a failed start leaves nothing that blocks a retry).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.files import check_writable_dir, describe_os_error

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(dir):`` or ``lock = RunLock(dir).acquire(); ...; lock.release()``."""

    def __init__(self, run_dir: str | os.PathLike, what: str = "train.output_dir") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.what = what
        self._fd: int | None = None
        self._created_dir = False
        self.took_over: dict | None = None  # what a stale lock said, when we replaced one

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        self._created_dir = not self.run_dir.exists()
        check_writable_dir(self.run_dir, self.what)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            self._cleanup_dir()
            hint = " (it is a symlink: remove it)" if e.errno == errno.ELOOP else ""
            raise UserError(f"cannot open the lock file {self.path}{hint}: {describe_os_error(e)}") from None
        try:
            previous = _read_owner(fd)
            if not _try_lock(fd, previous):
                os.close(fd)
                raise UserError(f"{self.what} {self.run_dir} is in use by another run "
                                f"({_owner_text(previous)}; lock file {self.path}); wait for it to "
                                f"finish or stop it, or choose another {self.what}")
            if previous and previous.get("pid") != os.getpid():
                self.took_over = previous
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except BaseException:
            self._cleanup_dir()
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an unlocked, empty .lock: "nobody"
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """Undo a failed start: the folder we created, if it holds only the lock file."""
        if not self._created_dir:
            return
        try:
            if {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE}:
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()
        except OSError:
            pass


def _try_lock(fd: int, previous: dict | None) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # no flock here (some network filesystems): fall back to the recorded pid
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return not (previous and _alive_here(previous))


def _alive_here(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume alive (the message names it)
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        owner = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_text(owner: dict | None) -> str:
    if not owner:
        return "a process that is starting up"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('started')}"


def lock_owner(run_dir: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``run_dir`` right now (None if nobody); for tools and tests."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_owner(fd) or {}
    finally:
        os.close(fd)
