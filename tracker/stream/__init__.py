"""The live-call core without Ray or a web server: the wire protocol, the per-connection session and
conversation-level refinement. ``services/`` wraps it in Ray Serve deployments and a WebSocket."""
