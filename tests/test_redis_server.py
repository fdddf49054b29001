"""The embedded Redis with a data directory of its own: AOF persistence, one owner at a time, orphans stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tracker.context.redis_server import DataDirInUse, EmbeddedRedis


def test_data_written_before_a_stop_is_there_after_a_start_with_a_new_object(tmp_path):
    with EmbeddedRedis(tmp_path / "redis", appendonly=True) as server:
        server.client().set("k", "v")
        server.client().xadd("s", {"f": "1"})
    assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
    with EmbeddedRedis(tmp_path / "redis", appendonly=True) as again:
        assert again.client().get("k") == b"v"
        assert again.client().xlen("s") == 1


def test_a_second_server_on_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    with EmbeddedRedis(tmp_path / "redis", appendonly=True):
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            EmbeddedRedis(tmp_path / "redis", appendonly=True)
    EmbeddedRedis(tmp_path / "redis", appendonly=True).stop()  # free again once the first stopped


def test_a_server_orphaned_by_a_killed_owner_is_stopped_and_its_data_kept(tmp_path):
    folder = tmp_path / "redis"
    script = (
        "import os, signal, sys\n"
        "from tracker.context.redis_server import EmbeddedRedis\n"
        f"s = EmbeddedRedis({str(folder)!r}, appendonly=True)\n"
        "s.client().set('survives', 'yes')\n"
        "print(s.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # no atexit, no cleanup: like `kill -9`
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    orphan = int(out.stdout.strip())
    try:
        os.kill(orphan, 0)  # still running without its owner
        with EmbeddedRedis(folder, appendonly=True) as server:
            assert server.pid != orphan
            deadline = time.time() + 5
            while time.time() < deadline and _alive(orphan):
                time.sleep(0.05)
            assert not _alive(orphan)
            assert server.client().get("survives") == b"yes"  # the orphan fsynced its AOF on SIGTERM
    finally:
        if _alive(orphan):
            os.kill(orphan, 9)


def test_a_data_directory_too_deep_for_a_unix_socket_keeps_its_data_there_and_the_socket_elsewhere(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep, appendonly=True) as server:
        server.client().set("k", "v")
        assert not str(server.socket_path).startswith(str(deep))
    assert (deep / "appendonly.aof").is_file()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
