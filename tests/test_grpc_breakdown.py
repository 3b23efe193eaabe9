"""bench/grpc_breakdown.py end to end on a small seeded gallery: a real server and the embedded
client on one data dir, the table, and a last JSON line whose parts add up to the whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "grpc_breakdown.py"
KEYS = {
    "echo_p50_ms", "search_p50_ms", "embedded_p50_ms", "over_echo_p50_ms", "over_echo_mean_ms", "wire_and_client_ms",
    "server_python_ms", "server_check_ms", "server_index_slowdown_ms", "idle_gap_ms", "busy_gap_ms", "padded_echo_ms",
    "embedded_over_faiss_ms", "client_saves_ms",
}  # fmt: skip


def test_breakdown_runs_and_its_parts_add_up(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--n", "600", "--calls", "40", "--warmup", "5", "--keep", str(tmp_path / "d")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("# grpc_breakdown: n=600, d=384, HNSW32") and "| measured | p50 ms | mean ms |" in lines
    fig = json.loads(lines[-1])
    assert set(fig) == KEYS
    assert all(isinstance(v, float) for v in fig.values())
    parts = (
        fig["wire_and_client_ms"]
        + fig["server_python_ms"]
        + fig["server_index_slowdown_ms"]
        - fig["server_check_ms"]
        - fig["embedded_over_faiss_ms"]
    )
    assert abs(parts - fig["over_echo_mean_ms"]) < 1e-3, (parts, fig)
    assert fig["echo_p50_ms"] > 0 and fig["search_p50_ms"] > fig["echo_p50_ms"] and fig["server_check_ms"] > 0
    # the data dir is kept and reused: a second run finds the collection
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(json.loads(again.stdout.strip().splitlines()[-1])) == KEYS
