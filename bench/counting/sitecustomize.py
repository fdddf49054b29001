"""Bench-only instrumentation: count Redis round trips and Ray Serve handle calls in every process.

`bench/stream_latency.py` puts this folder on PYTHONPATH (so Ray's workers, which inherit the
environment, import it too) with TRACKER_BENCH_COUNT_DIR set. Each process then counts
- Redis round trips: every `send_packed_command` of redis-py (a single command or a whole
  pipeline is sent with one call; a NOSCRIPT retry of EVALSHA counts twice), by first command name;
- Ray calls: every `DeploymentHandle.remote`, by deployment and method;
and writes its counters to <dir>/<pid>.json twice a second. The same file counts the code of any
commit (before and after), since it patches the libraries, not the tracker.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("TRACKER_BENCH_COUNT_DIR")

if _DIR:
    import importlib.abc
    import importlib.machinery
    import json
    import sys
    import threading
    import time

    _counts: dict[str, dict[str, int]] = {"redis": {}, "ray": {}}
    _lock = threading.Lock()

    def _bump(kind: str, name: str) -> None:
        with _lock:
            _counts[kind][name] = _counts[kind].get(name, 0) + 1

    def _command_name(packed) -> str:
        try:
            first = packed[0] if isinstance(packed, (list, tuple)) else packed
            first = bytes(first)
            parts = first.split(b"\r\n")
            n = int(parts[0][1:])
            name = parts[2].decode().upper()
            if isinstance(packed, (list, tuple)) and len(packed) > 1 or first.count(b"\r\n*") > 0:
                name = "PIPELINE:" + name
            return name if n else "?"
        except Exception:
            return "?"

    def _patch_redis(module) -> None:
        cls = getattr(module, "AbstractConnection", None)
        if cls is None or getattr(cls, "_bench_patched", False):
            return
        original = cls.send_packed_command
        if module.__name__.startswith("redis.asyncio"):
            async def send_packed_command(self, command, check_health=True):
                _bump("redis", _command_name(command))
                return await original(self, command, check_health)
        else:
            def send_packed_command(self, command, check_health=True):
                _bump("redis", _command_name(command))
                return original(self, command, check_health)
        cls.send_packed_command = send_packed_command
        cls._bench_patched = True

    def _patch_handle(module) -> None:
        cls = getattr(module, "DeploymentHandle", None)
        if cls is None or getattr(cls, "_bench_patched", False):
            return
        original = cls.remote

        def remote(self, *args, **kwargs):
            _bump("ray", f"{self.deployment_name}.{self.handle_options.method_name}")
            return original(self, *args, **kwargs)

        cls.remote = remote
        cls._bench_patched = True

    _PATCHES = {"redis.connection": _patch_redis, "redis.asyncio.connection": _patch_redis,
                "ray.serve.handle": _patch_handle}

    class _Hook(importlib.abc.MetaPathFinder):
        """Patches a module right after it is first imported."""

        def find_spec(self, name, path=None, target=None):
            if name not in _PATCHES:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return None
            loader = spec.loader
            run = loader.exec_module

            def exec_module(module, _run=run, _name=name):
                _run(module)
                _PATCHES[_name](module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())

    def _dump() -> None:
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        last = None
        while True:
            time.sleep(0.5)
            with _lock:
                snap = json.dumps(_counts)
            if snap != last:
                tmp = path + ".tmp"
                with open(tmp, "w") as fh:
                    fh.write(snap)
                os.replace(tmp, path)
                last = snap

    threading.Thread(target=_dump, daemon=True, name="bench-counter").start()
