"""The README's Python quickstart works as written (against a server on a free port)."""

from __future__ import annotations

import re
from pathlib import Path

from interlingua.server import Server

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(server: tuple[Server, int], capsys: object) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "README has no python block"
    _, port = server
    exec(compile(code.group(1).replace("localhost:50051", f"127.0.0.1:{port}"), "README.md", "exec"), {})
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "['doc-0' 'doc-1' 'doc-2']" in out and "state='ready'" in out
