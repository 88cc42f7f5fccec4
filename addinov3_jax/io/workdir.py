"""Output folders that commands own: writable (checked before any heavy work), locked for the
length of a run (`train` workdirs, `predict` outputs), files replaced atomically, and write
failures (a full disk) as one line that names the path and says what to do."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path


class WorkdirBusy(RuntimeError):
    """Another command holds the folder's lock."""


class WriteFailed(OSError):
    """A file of a run could not be written (disk full, quota, read-only); the message names it."""


def ensure_writable(path: Path, flag: str = "--workdir") -> None:
    """Fails before any heavy work when `path` cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"  # unique per host
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{path}: not writable ({e.strerror or e}); choose another {flag} "
                              "or fix its permissions") from None


class WorkdirLock:
    """`FOLDER/.lock` (pid, host, command) held for the length of a run: a second command in the
    same folder is refused with the owner's pid; a stale lock (dead pid on this host) is taken
    over."""

    def __init__(self, workdir: Path, enabled: bool = True, command: str = "train"):
        self.path, self.enabled, self.command = Path(workdir) / ".lock", enabled, command

    def __enter__(self):
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    owner = {}
                if owner.get("host") == me["host"] and not _alive(owner.get("pid", -1)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise WorkdirBusy(
                    f"{self.path.parent}: another `addinov3 {owner.get('command', 'train')}` (pid "
                    f"{owner.get('pid', '?')} on {owner.get('host', '?')}) is using this folder; "
                    f"wait for it to finish, choose another folder, or delete {self.path} if that "
                    "process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RuntimeError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc):
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then `tmp` renamed onto `path`: readers see the old file or the new one,
    never half of one (a kill, a full disk). Failures raise `WriteFailed` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with write_guard(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def write_guard(path, what: str = "rerun the same command"):
    """Turns a failed write (OSError, safetensors' SafetensorError) into one `WriteFailed` line:
    the path, the reason, and what to do (`what`)."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        if not _is_write_error(e):
            raise
        no_space = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
        reason = ("the disk is full" if no_space else
                  (getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__))
        hint = "free some disk space (or choose another folder)" if no_space else "fix the folder"
        failed = WriteFailed(f"{path}: could not write ({reason}); {hint} and {what}")
        failed.errno = getattr(e, "errno", None) or errno.EIO
        raise failed from e


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def strict_json(obj, **kw) -> str:
    """`json.dumps` for files people parse with any JSON reader: NaN and infinities (undefined
    metrics, a diverged loss) become `null` instead of the non-standard `NaN` tokens."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kw)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():  # numpy scalars
        return _finite_or_none(obj.item())
    return obj
