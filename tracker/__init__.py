"""tracker: a streaming conversation emotion tracker.

The library (this package) holds the model, audio, data, context and training code and runs
without Ray or a web server; `services/` wraps it in Ray Serve deployments and `clients/` talks
to those services.
"""

__version__ = "0.1.0"
