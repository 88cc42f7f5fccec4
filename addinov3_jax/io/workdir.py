"""Work and output directories: writable before any heavy work, and locked for the length of a
run (`train`, `eval` and `predict` refuse a directory another run is using)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


class WorkdirBusy(RuntimeError):
    """Another `train` holds the workdir's lock."""


def ensure_writable(path: Path) -> None:
    """Fails before any heavy work when `path` cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"  # unique per host
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{path}: not writable ({e.strerror or e}); choose another --workdir "
                              "or fix its permissions") from None


class WorkdirLock:
    """`WORKDIR/.lock` (pid and host) held for the length of a run: a second `train` in the same
    workdir is refused with the owner's pid; a stale lock (dead pid on this host) is taken over."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path, self.enabled = workdir / ".lock", enabled

    def __enter__(self):
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname()}
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
                    f"{self.path.parent}: another `addinov3 train` (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}) is using this workdir; wait for it to finish, or "
                    f"delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RuntimeError(f"{self.path}: could not take the workdir lock")

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
