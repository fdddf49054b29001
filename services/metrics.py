"""The service's Prometheus metrics, defined once, recorded through Ray's metrics API.

Every deployment records into `ray.util.metrics` objects; Ray's metrics agent on each node
exports them for Prometheus at ``http://<node>:<metrics export port>/metrics`` (``tracker serve
--metrics-port``, ``ray start --metrics-export-port``). Ray prefixes each name with ``ray_`` and
counters get ``_total``: ``utterances_labelled`` below is scraped as
``ray_tracker_utterances_labelled_total``. docs/operations.md lists them all.

Recording is a few cheap calls; outside a Ray worker (in-process tests) every call is a no-op, and
a metrics failure never fails a request.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

# seconds: from tens of milliseconds (a text-only label) to a minute (a refined final on a busy node)
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]
WORK_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]

# name -> (kind, description, tag keys, histogram boundaries)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "tracker_utterances_labelled": ("counter", "Utterance results stored (final or interim), retries not counted",
                                    ("final",), None),
    "tracker_final_latency_seconds": ("histogram", "End of speech known (segment released or utterance received) to "
                                      "its final label sent on the stream", (), LATENCY_BOUNDARIES),
    "tracker_queue_depth": ("gauge", "Utterances waiting: 'session' = queued in this ingress replica's streams for "
                            "labels, 'model' = accepted by this model replica and not yet answered", ("stage",), None),
    "tracker_model_seconds": ("histogram", "Seconds per model forward batch ('label' the emotion model, 'refine' the "
                              "refiner)", ("stage",), WORK_BOUNDARIES),
    "tracker_model_batch_size": ("histogram", "Utterances per emotion-model batch", (),
                                 [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]),
    "tracker_features_seconds": ("histogram", "Seconds to compute one utterance's acoustic features", (),
                                 WORK_BOUNDARIES),
    "tracker_asr_seconds": ("histogram", "Seconds of speech recognition per utterance", (), WORK_BOUNDARIES),
    "tracker_cache_hits": ("counter", "Cache lookups that found what they needed, by cache", ("cache",), None),
    "tracker_cache_misses": ("counter", "Cache lookups that missed (or had to rebuild), by cache", ("cache",), None),
    "tracker_errors": ("counter", "Error messages sent and connections refused, by protocol error code "
                       "(docs/protocol.md)", ("code",), None),
    "tracker_alerts": ("counter", "Escalation alerts raised and cleared (stored now; retries not counted)",
                       ("kind",), None),
    "tracker_webhook_deliveries": ("counter", "Webhook deliveries by outcome: delivered, retried, dead_lettered",
                                   ("outcome",), None),
}

_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_disabled = False


def _get(name: str) -> Any | None:
    """The metric object of this process (created on first use), or None when metrics are unavailable."""
    global _disabled
    if _disabled:
        return None
    m = _metrics.get(name)
    if m is not None:
        return m
    with _lock:
        if name in _metrics:
            return _metrics[name]
        try:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                return None  # not in a Ray process (yet): record nothing, try again later
            kind, desc, tags, bounds = DEFINITIONS[name]
            if kind == "counter":
                m = rm.Counter(name, desc, tag_keys=tags)
            elif kind == "gauge":
                m = rm.Gauge(name, desc, tag_keys=tags)
            else:
                m = rm.Histogram(name, desc, boundaries=bounds, tag_keys=tags)
        except Exception as exc:  # an old or minimal Ray: run without metrics
            log.warning("metrics disabled: %s: %s", type(exc).__name__, exc)
            _disabled = True
            return None
        _metrics[name] = m
        return m


def _tags(tags: dict[str, Any] | None) -> dict[str, str] | None:
    return {k: str(v) for k, v in tags.items()} if tags else None


def _record(name: str, method: str, value: float, tags: dict[str, Any]) -> None:
    """`metric.<method>(value, tags)` on metric `name`; metrics never fail the caller."""
    m = _get(name)
    if m is not None:
        try:
            getattr(m, method)(value, tags=_tags(tags))
        except Exception:
            log.debug("metric %s: %s failed", name, method, exc_info=True)


def inc(name: str, value: float = 1.0, **tags: Any) -> None:
    if value > 0:
        _record(name, "inc", value, tags)


def observe(name: str, value: float, **tags: Any) -> None:
    _record(name, "observe", value, tags)


def set_gauge(name: str, value: float, **tags: Any) -> None:
    _record(name, "set", value, tags)


@contextmanager
def timed(name: str, **tags: Any) -> Iterator[None]:
    """Observe the block's wall-clock seconds in histogram `name` (also when it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        observe(name, time.perf_counter() - t0, **tags)


class SessionMetrics:
    """A StreamSession observer (tracker.stream.session.SessionObserver) for one ingress replica's streams."""

    def __init__(self) -> None:
        self.waiting = 0  # utterances queued in every stream of this replica

    def queued(self, delta: int) -> None:
        self.waiting = max(0, self.waiting + delta)
        set_gauge("tracker_queue_depth", self.waiting, stage="session")

    def final_sent(self, record: dict[str, Any], seconds_since_release: float) -> None:
        observe("tracker_final_latency_seconds", seconds_since_release)

    def error_sent(self, code: int) -> None:
        inc("tracker_errors", code=code)


class CacheCounter:
    """Turns a cache's cumulative hit/miss counts into counter increments (call `update` after use)."""

    def __init__(self, cache: str) -> None:
        self.cache = cache
        self.hits = 0
        self.misses = 0

    def update(self, hits: int, misses: int) -> None:
        if hits > self.hits:
            inc("tracker_cache_hits", hits - self.hits, cache=self.cache)
        if misses > self.misses:
            inc("tracker_cache_misses", misses - self.misses, cache=self.cache)
        self.hits, self.misses = max(self.hits, hits), max(self.misses, misses)


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Sum each tracker series over its labels except the ones named in the key: a test's and an operator's
    quick look. Keys are ``name`` or ``name{tag=value}`` for the tag keys the metric defines."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return parse_exposition(text)


def parse_exposition(text: str) -> dict[str, float]:
    """The ``ray_tracker_*`` samples of a Prometheus text exposition, summed over Ray's own labels."""
    import re

    own = {k: tags for k, (_, _, tags, _) in DEFINITIONS.items()}
    out: dict[str, float] = {}
    sample = re.compile(r'^(ray_tracker_[a-zA-Z0-9_]+)(?:\{(.*)\})?\s+([-+0-9.eEinfaINF]+)')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        m = sample.match(line)
        if not m:
            continue
        name, labels, value = m.group(1)[len("ray_"):], dict(label.findall(m.group(2) or "")), float(m.group(3))
        base = next((b for b in own if name == b or name.startswith(b + "_")), None)
        keep = [k for k in (own.get(base, ()) if base else ()) if k in labels] + (["le"] if "le" in labels else [])
        key = name + ("{" + ",".join(f"{k}={labels[k]}" for k in keep) + "}" if keep else "")
        out[key] = out.get(key, 0.0) + value
    return out


__all__ = ["DEFINITIONS", "CacheCounter", "SessionMetrics", "inc", "observe", "parse_exposition", "scrape",
           "set_gauge", "timed"]
