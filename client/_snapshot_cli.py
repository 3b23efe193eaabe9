"""The snapshot commands of the ``interlingua`` CLI.

::

    interlingua snapshots {list, create [NAME], delete NAME, verify NAME} [--json]
    interlingua backup --to DIR [--name NAME] [--keep]    # snapshot on the server, download, check
    interlingua restore SNAPSHOT_DIR --data-dir DIR        # offline: the server on DIR is stopped

``backup`` creates a snapshot over gRPC, streams it into ``DIR`` (checked against its
manifest) and deletes it on the server unless ``--keep``. ``restore`` imports the
server's ``restore.py`` and runs without a server. Covered by ``tests/test_snapshots.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._client import Client
from ._snapshots import SnapshotInfo

__all__ = ["COMMANDS", "add_parsers", "restore_offline", "run"]

COMMANDS = ("snapshots", "backup")


def add_parsers(sub: Any, conn: argparse.ArgumentParser) -> None:
    """Adds ``snapshots``, ``backup`` and ``restore`` to the CLI's subparsers ``sub``."""
    snaps = sub.add_parser("snapshots", help="snapshots on the server").add_subparsers(dest="action", required=True)
    snaps.add_parser("list", parents=[conn], help="list snapshots")
    snaps.add_parser("create", parents=[conn], help="snapshot the store now").add_argument(
        "name", nargs="?", default=""
    )
    snaps.add_parser("delete", parents=[conn], help="delete a snapshot").add_argument("name")
    snaps.add_parser("verify", parents=[conn], help="check a snapshot's files").add_argument("name")
    p = sub.add_parser("backup", parents=[conn], help="snapshot the server and download it into a new folder")
    p.add_argument("--to", required=True, help="folder to create (absent or empty)")
    p.add_argument("--name", default="", help="snapshot name (default: snap-<UTC time>)")
    p.add_argument("--keep", action="store_true", help="keep the snapshot on the server after the download")
    p = sub.add_parser("restore", help="offline: replace a stopped server's store with a snapshot")
    p.add_argument("snapshot", help="snapshot folder (from backup, or <data_dir>/snapshots/<name>)")
    p.add_argument("--data-dir", required=True, help="the stopped server's data directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _print(infos: list[SnapshotInfo], as_json: bool) -> None:
    for s in infos:
        if as_json:
            print(json.dumps({k: v for k, v in vars(s).items() if k != "manifest"}), file=sys.stdout)
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.created_at))
            points = sum(s.points.values())
            print(
                f"{s.name}  {when} UTC  sequence {s.sequence}  {len(s.points)} collections  {points} points"
                f"  {s.bytes} bytes",
                file=sys.stdout,
            )


def run(client: Client, args: argparse.Namespace) -> None:
    """Runs ``snapshots ...`` or ``backup``."""
    if args.command == "backup":
        info = client.create_snapshot(args.name)
        try:
            client.download_snapshot(info.name, args.to)
        finally:
            if not args.keep:
                client.delete_snapshot(info.name)
        _print([info], args.json)
        if not args.json:
            print(f"backed up to {args.to}", file=sys.stdout)
    elif args.action == "list":
        _print(client.list_snapshots(), args.json)
    elif args.action == "create":
        _print([client.create_snapshot(args.name)], args.json)
    elif args.action == "delete":
        client.delete_snapshot(args.name)
        print(f"deleted snapshot {args.name}", file=sys.stdout)
    elif args.action == "verify":
        _print([client.verify_snapshot(args.name)], args.json)


def restore_offline(args: argparse.Namespace) -> None:
    """``interlingua restore``: raises the server's FailedPrecondition or OSError when refused."""
    from interlingua.server.restore import restore

    done = restore(Path(args.snapshot), Path(args.data_dir))
    m = done.manifest
    out: dict[str, Any] = {"name": m.name, "sequence": m.sequence, "collections": len(m.collections)}
    out["previous"] = str(done.previous) if done.previous else None
    if args.json:
        print(json.dumps(out), file=sys.stdout)
        return
    print(f"restored snapshot {m.name} (sequence {m.sequence}, {len(m.collections)} collections) into {args.data_dir}")
    if done.previous:
        print(f"the previous store and index checkpoints are in {done.previous} (delete it when done)")
    print("start the server: it rebuilds every index from the restored store before it reports SERVING")
