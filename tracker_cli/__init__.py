"""The `tracker` command line: sits above the library (`tracker/`), the services and the clients."""

from tracker_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
