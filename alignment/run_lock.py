"""One process per run directory: :class:`RunLock` (an flock on ``RUN/lock``; see its docstring)."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from alignment.files import StoreError, fsync_dir, make_dir, now_iso, store_error, unlink_quiet

try:  # fcntl is POSIX-only; without it RunLock falls back to pid checks
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "lock"


class RunLocked(StoreError):
    """Another live process owns the run directory."""

    def __init__(self, message: str, *, path=None, holder: dict | None = None):
        super().__init__(message, path=path)
        self.holder = holder or {}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


# Locks taken with ``acquire(inheritable=True)``, by (pid, resolved run dir): a later RunLock of
# the same run in the same process inherits them. The pid guards against a forked child.
_INHERITABLE: dict[tuple[int, str], "RunLock"] = {}


def flock_held(path: Path) -> bool | None:
    """Whether some process holds an flock on ``path`` (Linux ``/proc/locks``: "FLOCK ADVISORY
    WRITE <pid> <major>:<minor>:<inode> ..." with major/minor in hex); None where unknown."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except FileNotFoundError:
        return False if not Path(path).exists() else None
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" not in fields or len(fields) < 6:
            continue
        dev = fields[fields.index("FLOCK") + 4].split(":")  # after ADVISORY WRITE <pid>
        try:
            if (int(dev[0], 16), int(dev[1], 16), int(dev[2])) == want:
                return True
        except (ValueError, IndexError):
            continue
    return False


class RunLock:
    """Exclusive ownership of a run directory by one process.

    The file ``RUN/lock`` holds JSON ``{pid, host, since}`` for humans and error messages;
    exclusion itself comes from an ``flock`` held on that file for the life of the owner.

    Why flock: the kernel drops it when the owning process dies (kill -9, OOM, power loss of
    a local process), so a stale lock is detected by simply being able to take the flock,
    and taking over is a single atomic kernel operation — two processes racing for a stale
    lock cannot both win. The protocol (a well-known pattern):

    1. ``open(lock, O_RDWR|O_CREAT)``, ``flock(LOCK_EX|LOCK_NB)``; if that fails a live
       process holds it -> :class:`RunLocked` naming pid/host/since from the file.
    2. After getting the flock, check the path still names the inode we locked (a releasing
       owner unlinks the file while still holding the flock); if not, retry.
    3. Truncate and write our ``{pid, host, since}``, fsync. If the old content named another
       pid, that owner died: ``took_over`` records it.
    4. Release: unlink the file, then drop the flock (close).

    Inheritance: the CLI takes the lock with ``acquire(inheritable=True)`` before Prefect starts
    (~20 s) and holds it to the end, so a second run is refused at once; the flow's own ``with
    store.lock()`` in the same process then *inherits* it (no second flock, no release on exit).

    Extra caution for shared storage (design §6): if the stale content names a *different
    host* we refuse rather than trust flock across hosts (NFS mounted with ``nolock`` gives
    host-local flocks), and say which file to delete if that process is really gone.
    Where flock is unsupported (ENOLCK/EOPNOTSUPP) we fall back to ``O_EXCL`` creation plus a
    same-host pid-liveness check; that fallback's takeover is not race-free (documented).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None
        self._inherited = False
        self.took_over: dict | None = None
        self.info: dict | None = None

    def _key(self) -> tuple[int, str]:
        return os.getpid(), str(self.root.resolve())

    # -- helpers
    def _holder_error(self, holder: dict | None) -> RunLocked:
        holder = holder or {}
        pid = holder.get("pid", "?")
        host = holder.get("host", "?")
        since = holder.get("since", "?")
        msg = f"run dir {self.root} is locked by pid {pid} on host {host} since {since}"
        if host != socket.gethostname():
            msg += f"; if that process is no longer running, delete {self.path} and retry"
        else:
            msg += "; wait for that process to finish or stop it"
        return RunLocked(msg, path=self.root, holder=holder)

    def _read_holder(self, retries: int = 20) -> dict | None:
        # The holder may have just created the file and not written it yet.
        import time

        for i in range(retries):
            try:
                text = self.path.read_text(encoding="utf-8")
                if text.strip():
                    return json.loads(text)
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return None

    def _my_info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}

    # -- API
    def acquire(self, *, inheritable: bool = False) -> "RunLock":
        """Take the lock (RunLocked if a live process holds it). ``inheritable``: later RunLocks
        of this run in this process inherit it instead of failing (see the class docstring)."""
        if self._fd is not None:
            raise StoreError(f"lock {self.path} is already held by this RunLock", path=self.path)
        owner = _INHERITABLE.get(self._key())
        if owner is not None and owner.held:
            self._fd, self._inherited, self.info = -1, True, owner.info
            return self
        make_dir(self.root)
        self._acquire()
        if inheritable:
            _INHERITABLE[self._key()] = self
        return self

    def _acquire(self) -> "RunLock":
        if fcntl is None:
            return self._acquire_excl()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise store_error("open lock file", self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._holder_error(self._read_holder()) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_excl()
                raise store_error("lock", self.path, e) from e
            # Did the file we locked get unlinked (released) before we locked it?
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                old = os.read(fd, 1 << 16).decode("utf-8", "replace")
                old_info = json.loads(old) if old.strip() else None
            except ValueError:
                old_info = None
            if isinstance(old_info, dict) and old_info.get("host") not in (None, socket.gethostname()):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise self._holder_error(old_info)
            info = self._my_info()
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                raise store_error("write lock file", self.path, e) from e
            self._fd = fd
            self.info = info
            self.took_over = old_info if isinstance(old_info, dict) else None
            return self
        raise StoreError(f"could not lock {self.path}: it keeps being replaced", path=self.path)

    def _acquire_excl(self) -> "RunLock":
        """Fallback without flock: O_EXCL + same-host pid check (takeover not race-free)."""
        for _ in range(3):
            info = self._my_info()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if (
                    holder
                    and holder.get("host") == socket.gethostname()
                    and not pid_alive(int(holder.get("pid", 0)))
                ):
                    unlink_quiet(self.path)
                    self.took_over = holder
                    continue
                raise self._holder_error(holder) from None
            except OSError as e:
                raise store_error("create lock file", self.path, e) from e
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._fd = -1
            self.info = info
            return self
        raise self._holder_error(self._read_holder())

    def release(self) -> None:
        if self._fd is None:
            return
        if self._inherited:  # the owner releases
            self._fd, self._inherited = None, False
            return
        if _INHERITABLE.get(self._key()) is self:
            del _INHERITABLE[self._key()]
        # Unlink while still holding the flock, so a waiter that opened the old inode
        # notices (inode check in acquire) instead of locking a deleted file.
        unlink_quiet(self.path)
        fsync_dir(self.root)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def inspect(self) -> dict | None:
        """The lock file's holder ``{pid, host, since}`` plus ``live`` (True: a process holds
        the lock; False: stale; None: another host, cannot tell) and ``pid_alive`` (the named
        pid exists, which after a SIGKILL may be an unrelated process); None without a lock file.
        On Linux ``live`` is the kernel's word (an flock on the file), not a pid guess."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        try:
            pid = int(holder.get("pid", 0))
        except (TypeError, ValueError):
            pid = 0
        alive = pid_alive(pid)
        live = None
        if holder.get("host") == socket.gethostname():
            flocked = flock_held(self.path) if fcntl is not None else None
            live = alive if flocked is None else flocked
        return holder | {"live": live, "pid_alive": alive}

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # No __del__: a RunLock dropped without release() keeps its flock until the process
    # exits (then the file is a stale lock that the next acquire takes over), rather than
    # silently unlocking a run that is still being worked on.



# --------------------------------------------------------------------------- store


