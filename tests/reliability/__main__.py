"""Driver of ``make reliability``: runs tests/reliability with pytest, then prints one JSON line.

    python -m tests.reliability [--soak-seconds S] [pytest args...]

Each test merges its figures into a temporary JSON file (``_harness.record``); this
driver assembles the summary from it and prints it as the last line of its output,
whatever the tests did (a figure a test never recorded is ``null``). The exit code
is pytest's. ``--soak-seconds`` (or ``RELIABILITY_SOAK_SECONDS``) sets the soak's
duration (default 600).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import RESULTS_ENV

HERE = Path(__file__).parent
#: the figures of the issue's "Done when", then the breakdowns behind them
HEADLINE = (
    "lost_writes",
    "failed_requests",
    "fuzz_cases",
    "fuzz_internal_or_unknown",
    "bricked_restarts",
    "soak_rss_growth_mb",
)


def summarize(results: dict[str, object], rc: int, seconds: float) -> dict[str, object]:
    out: dict[str, object] = {k: results.get(k) for k in HEADLINE}
    parts = [results.get(k) for k in ("swap_failed_requests", "flood_probe_failures")]
    out["failed_requests"] = (
        sum(int(p) for p in parts if isinstance(p, int | float)) if any(p is not None for p in parts) else None
    )
    out.update({k: v for k, v in sorted(results.items()) if k not in out})
    out["pytest_exit_code"] = rc
    out["wall_seconds"] = round(seconds, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__.splitlines()[0])
    ap.add_argument("--soak-seconds", type=float, default=None, help="soak duration (default 600)")
    args, pytest_args = ap.parse_known_args(argv)
    env = dict(os.environ, INTERLINGUA_RELIABILITY="1")
    if args.soak_seconds is not None:
        env["RELIABILITY_SOAK_SECONDS"] = str(args.soak_seconds)
    with tempfile.TemporaryDirectory(prefix="interlingua-reliability-") as tmp:
        results_path = Path(tmp) / "results.json"
        env[RESULTS_ENV] = str(results_path)
        cmd = [sys.executable, "-m", "pytest", str(HERE), "-v", "-s", "-p", "no:cacheprovider", *pytest_args]
        t0 = time.monotonic()
        rc = subprocess.call(cmd, env=env)
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
    sys.stdout.flush()
    print(json.dumps(summarize(results, rc, time.monotonic() - t0)), flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
