"""Environment every Ray process of the tracker starts with (services and Ray Train alike)."""

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only; a multi-node cluster needs "1" (docs/deploy.md)
    # Ray starts its workers at nice 15, so any other work on the host (a training run, a test suite, even
    # a nice 5 job) takes the cores from the service's replicas first and labels queue behind it: serve at
    # the priority the node gives the raylet (bench/stream_latency.py measured the difference: BENCHMARKS.md)
    "RAY_worker_niceness": "0",
    # a 2-core machine that is also training or testing answers health checks slowly; don't kill the proxy for it
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}

# `--transport haproxy`: Ray Serve's HAProxy ingress in front of ingress replicas that serve HTTP and
# WebSockets themselves (direct ingress). Every WebSocket message then goes client -> HAProxy -> the
# Ingress replica's own server, instead of through the Python Serve proxy and one Ray call per message
# into the replica: about 0.15 instead of 0.8-1.0 ms of CPU per message (BENCHMARKS.md, "The transport"). Set
# before Ray starts (on every `ray start` of a cluster). HAProxy also opens a Prometheus port (9101)
# and a stats page (8404) on all interfaces, which Ray 2.60 does not let us bind to loopback.
TRANSPORT_ENV = {
    "serve": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                # a stopping ingress replica stays open this long so that load balancers stop sending to it
                # (Ray's default 30 s, which made every stop take over 30 s); HAProxy, the balancer here,
                # health-checks every 250 ms once a server fails and retries refused connections elsewhere
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"},
}
