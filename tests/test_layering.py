"""The rooms' arrows point down: the library never imports the services, the clients or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("services", "clients", "tracker_cli")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_library_never_imports_services_clients_or_cli():
    bad = []
    for path in sorted((ROOT / "tracker").rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[0] in UPPER:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_services_never_import_clients_or_cli():
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in sorted((ROOT / "services").rglob("*.py"))
           for n in _imports(p) if n.split(".")[0] in ("clients", "tracker_cli")]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: an upward import in a file is reported."""
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom services.app import build_app\n\ndef f():\n    import clients.local\n")
    assert [n for n in _imports(f) if n.split(".")[0] in UPPER] == ["services.app", "clients.local"]


def test_data_context_audio_and_stream_load_without_torch():
    """The plain types live on the ground floor: reading data, the store or a live session never pulls in torch."""
    import subprocess
    import sys

    code = ("import sys, tracker.data, tracker.context.store, tracker.stream.session, tracker.stream.pipeline, "
            "tracker.types, tracker.context_window, tracker.cache; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"torch was imported: {out.stdout[:300]}"
