"""Environment every Ray process of the tracker starts with (services and Ray Train alike)."""

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only; a multi-node cluster needs "1" (docs/deploy.md)
    # a 2-core machine that is also training or testing answers health checks slowly; don't kill the proxy for it
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}
