"""The migration commands of the ``interlingua`` CLI (MigrationService, docs/MIGRATION.md).

::

    interlingua migrations start COLLECTION --new-space S --transform T [--reverse-transform R]
                                 [--strategy two_indexes|shared_index]
    interlingua migrations get COLLECTION
    interlingua migrations cutover COLLECTION [--force]
    interlingua migrations {rollback, finish, abort} COLLECTION
    interlingua migrations forward COLLECTION --transform F [--wait [--wait-timeout S] [--no-progress]]
    interlingua migrations suggest COLLECTION -n N [--out ids.txt]

Every command but ``suggest`` prints the migration (one field per line; ``--json``: one
object). ``suggest`` prints one id per line (``--json``: one ``{"id", "score"}`` object per
line), or writes them to ``--out`` (the ``--ids``/``--only-ids`` file of ``interlingua
ingest``) and prints a summary. The backfill itself is ``interlingua ingest COLLECTION
--space NEW_SPACE ...``. Covered by ``tests/test_migration_client.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from ._cli_common import UsageError
from ._client import Client
from ._output import print_json, print_table
from ._types import MIGRATION_STRATEGIES, BackfillOrder, MigrationInfo

__all__ = ["COMMANDS", "add_parsers", "print_migration", "read_id_list", "run", "select_rows"]

COMMANDS = ("migrations",)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_parsers(sub: Any, conn: argparse.ArgumentParser) -> None:
    """Adds ``migrations {start,get,cutover,rollback,finish,abort,forward,suggest}`` to the subparsers ``sub``."""
    migs = sub.add_parser("migrations", help="move a collection to a new model's space")
    acts = migs.add_subparsers(dest="action", required=True)
    p = acts.add_parser("start", parents=[conn], help="start migrating a collection to a new space (backfill)")
    p.add_argument("collection")
    p.add_argument("--new-space", required=True, help="the new model's space (registered)")
    p.add_argument("--transform", required=True, help="ready transform NEW_SPACE -> home space (new-model queries)")
    p.add_argument(
        "--reverse-transform",
        default="",
        help="ready transform home space -> NEW_SPACE (old-model queries after cutover)",
    )
    p.add_argument("--strategy", choices=list(MIGRATION_STRATEGIES), help="default: the server's (two_indexes)")
    acts.add_parser("get", parents=[conn], help="phase, coverage and forward upgrade").add_argument("collection")
    p = acts.add_parser("cutover", parents=[conn], help="make the new space home (atomic; rollback possible)")
    p.add_argument("collection")
    p.add_argument("--force", action="store_true", help="below 100%% coverage: serve projections (forward upgrade)")
    acts.add_parser("rollback", parents=[conn], help="undo the cutover: old space home again").add_argument(
        "collection"
    )
    acts.add_parser("finish", parents=[conn], help="drop the old vectors after a cutover").add_argument("collection")
    acts.add_parser("abort", parents=[conn], help="abandon the migration: old space stays home").add_argument(
        "collection"
    )
    p = acts.add_parser("forward", parents=[conn], help="project every old vector into the new space (background)")
    p.add_argument("collection")
    p.add_argument("--transform", required=True, help="ready transform home space -> new space (gallery side)")
    p.add_argument("--wait", action="store_true", help="wait until it is done (exit 1 if it fails)")
    p.add_argument("--wait-timeout", type=float, help="seconds to wait (default: no limit)")
    p.add_argument("--no-progress", action="store_true")
    p = acts.add_parser("suggest", parents=[conn], help="ids to re-embed first, best first")
    p.add_argument("collection")
    p.add_argument("-n", type=_positive, required=True, help="how many ids")
    p.add_argument("--out", help="write the ids here, one per line (default: print them)")


def read_id_list(path: str) -> list[str]:
    """The ids of a file, one per line (blank lines skipped, duplicates dropped, order kept)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read ids from {path}: {err}") from None
    wanted = list(dict.fromkeys(line for line in lines if line))
    if not wanted:
        raise UsageError(f"{path} lists no ids")
    return wanted


def select_rows(ids: Sequence[str], wanted: Sequence[str], path: str) -> list[int]:
    """The rows of ``ids`` holding each of ``wanted``, in ``wanted``'s order (``ingest --only-ids``)."""
    row = {id_: i for i, id_ in enumerate(ids)}
    missing = [id_ for id_ in wanted if id_ not in row]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UsageError(f"{len(missing)} of the {len(wanted)} ids in {path} are not in the vectors' ids: {shown}")
    return [row[id_] for id_ in wanted]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") + " UTC" if ts else "-"


def print_migration(info: MigrationInfo, as_json: bool, out: TextIO) -> None:
    """One migration, one field per line (calibration and forward upgrade on one line each)."""
    if as_json:
        print_json([info], out)
        return
    fields: dict[str, Any] = dataclasses.asdict(info)
    fields["coverage"] = f"{info.coverage:.2%} ({info.backfilled}/{info.points} backfilled, {info.projected} projected)"
    for key in ("points", "backfilled", "projected"):
        del fields[key]
    cal = info.calibration
    fields["calibration"] = "-" if cal is None else f"scale={cal.scale:.6g} bias={cal.bias:.6g} ({cal.source})"
    fwd = info.forward
    if fwd.state:
        error = f": {fwd.error}" if fwd.error else ""
        fields["forward"] = f"{fwd.state} {fwd.done}/{fwd.total} ({fwd.fraction:.0%}) via {fwd.transform}{error}"
    else:
        fields["forward"] = "-"
    for key in ("started_at", "cutover_at", "finished_at"):
        fields[key] = _when(fields[key])
    fields["reverse_transform"] = info.reverse_transform or "-"
    print_table(("FIELD", "VALUE"), [(k, str(v)) for k, v in fields.items()], out)


def _suggest(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    order: BackfillOrder = client.suggest_backfill_order(args.collection, args.n)
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.writelines(f"{id_}\n" for id_ in order.ids)
        except OSError as err:
            raise UsageError(f"cannot write ids to {args.out}: {err}") from None
        if args.json:
            print_json([{"collection": args.collection, "out": args.out, "ids": len(order)}], out)
        else:
            print(f"wrote {len(order)} ids of {args.collection} to {args.out} (best first)", file=out)
    elif args.json:
        print_json([{"id": i, "score": float(s)} for i, s in zip(order.ids, order.scores, strict=True)], out)
    else:
        out.writelines(f"{id_}\n" for id_ in order.ids)


def run(client: Client, args: argparse.Namespace) -> None:
    """Runs ``migrations ...``."""
    out = sys.stdout
    c = args.collection
    if args.action == "suggest":
        _suggest(client, args, out)
        return
    if args.action == "start":
        info = client.start_migration(
            c, args.new_space, args.transform, reverse_transform=args.reverse_transform, strategy=args.strategy
        )
    elif args.action == "get":
        info = client.get_migration(c)
    elif args.action == "cutover":
        info = client.cutover(c, force=args.force)
    elif args.action == "rollback":
        info = client.rollback_cutover(c)
    elif args.action == "finish":
        info = client.finish_migration(c)
    elif args.action == "abort":
        info = client.abort_migration(c)
    else:  # forward
        info = client.forward_upgrade(c, args.transform)
        if args.wait:
            progress = not (args.no_progress or args.json)
            info = client.wait_forward_upgrade(c, args.wait_timeout, progress=progress)
    print_migration(info, args.json, out)
