"""The ``interlingua`` command line: ``serve`` the service, or talk to one as a client.

::

    interlingua serve [--config server.toml] [--data-dir D] [--port P] [--no-metrics] [--device cuda] ...
    interlingua spaces {list,register,get} ...      interlingua collections {list,create,get,delete,recommend,move} ...
    interlingua collections create NAME --home-space S --index auto --recall 0.95
    interlingua collections recommend NAME --recall 0.95 [-k 10] [--queries xq.npy] [--candidates SPEC ...] [--json]
    interlingua collections move NAME [--to milvus://HOST:PORT | http://HOST:PORT | FILE.db] [--json]
    interlingua ingest COLLECTION --space S --vectors xb.npy [--ids ids.txt] [--payloads p.jsonl] [--only-ids F]
    interlingua search COLLECTION --space S --vectors xq.npy [--rows 0:5] [-k 10] [--json]
    interlingua stats [COLLECTION] [--json]         interlingua health
    interlingua transforms {list,get NAME,cancel NAME,delete NAME} [--json]
    interlingua fit NAME --kind K --source-space S --target-space T --doc-pairs NEW.npy HOME.npy
                    [--query-pairs NEW.npy HOME.npy] [--eval-dir DIR] [--config JSON] [--holdout F]
                    [--chain A B ...] [--no-wait] [--offline OUT.npz [--home-metric M]]
    interlingua routes {list COLLECTION, activate COLLECTION TRANSFORM [--force],
                        rollback COLLECTION QUERY_SPACE, shadow COLLECTION QUERY_SPACE {TRANSFORM [--rate R] | --stop}}
    interlingua snapshots {list,create [NAME],delete NAME,verify NAME}   (see _snapshot_cli.py)
    interlingua migrations {start,get,cutover,rollback,finish,abort,forward,suggest} COLLECTION ...
                                                    (see _migration_cli.py)
    interlingua backup --to DIR [--name N] [--keep]    interlingua restore SNAPSHOT_DIR --data-dir DIR  (offline)

Client commands read ``--target`` (default ``$INTERLINGUA_TARGET`` or
``localhost:50051``) and ``--api-key`` (default ``$INTERLINGUA_API_KEY``). Exit
codes: 0 ok, 1 the server refused (``error: <CODE>: <message>`` on stderr), 2 a
usage or local-file error (``fit --offline``: also a fit the library refused).
The server is imported only by ``serve`` and ``fit --offline`` (see
``_fit_cli.py``), so client commands start fast. Covered by ``tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import _migration_cli, _snapshot_cli
from ._cli_common import RowIds, UsageError, load_array, parse_rows, read_lines
from ._client import Client
from ._exceptions import InterlinguaError
from ._migration_cli import read_id_list, select_rows
from ._output import (
    print_collection,
    print_collections,
    print_move,
    print_recommendation,
    print_routes,
    print_routes_listing,
    print_search,
    print_spaces,
    print_transform,
    print_transforms,
)
from ._types import KINDS, METRICS, milvus_uri

if TYPE_CHECKING:
    from interlingua.server.config import ServerConfig

__all__ = ["build_parser", "build_server_config", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interlingua", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--target", help="server address (default: $INTERLINGUA_TARGET or localhost:50051)")
    conn.add_argument("--api-key", help="API key (default: $INTERLINGUA_API_KEY)")
    conn.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: 30)")
    conn.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")

    serve = sub.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    serve.add_argument("--config", help="TOML file (default: $INTERLINGUA_CONFIG)")
    serve.add_argument("--data-dir", help="data directory (default: ./data)")
    serve.add_argument("--host", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port, 0 = any free port (default: 50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = any free port (default: 9100)")
    serve.add_argument("--no-metrics", action="store_true", help="serve no /metrics endpoint")
    serve.add_argument("--api-key", help="require this API key on every call")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    serve.add_argument("--metrics-auth", action="store_true", help="/metrics needs 'Authorization: Bearer <key>'")
    serve.add_argument("--workers", type=int, help="gRPC worker threads")
    serve.add_argument("--omp-threads", type=int, help="FAISS OpenMP threads")
    serve.add_argument(
        "--device", help="cpu, cuda or cuda:N: where indexes are searched (default: $INTERLINGUA_DEVICE or cpu)"
    )
    serve.add_argument("--min-retention", type=float, help="default gate: least retention (default 0.85)")
    serve.add_argument("--max-negative-flip-rate", type=float, help="default gate: most negative-flip rate (1.0)")
    serve.add_argument(
        "--require-ecc", action=argparse.BooleanOptionalAction, default=None, help="default gate: require ECC"
    )
    serve.add_argument(
        "--backend", choices=["embedded", "milvus"], help="new collections' default backend (default: embedded)"
    )
    serve.add_argument(
        "--milvus-uri", help="milvus backend: http://host:19530 or a Milvus Lite file (<data-dir>/milvus.db)"
    )
    serve.add_argument(
        "--registry",
        help="share spaces, transforms, milvus collections and their routes with other front-ends: "
        "etcd://host:2379/<prefix> (docs/ARCHITECTURE.md)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    spaces = sub.add_parser("spaces", help="embedding spaces").add_subparsers(dest="action", required=True)
    spaces.add_parser("list", parents=[conn], help="list spaces")
    p = spaces.add_parser("register", parents=[conn], help="register a space")
    p.add_argument("name")
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--metric", choices=["cosine", "ip", "l2"], default="cosine")
    p.add_argument("--description", default="")
    spaces.add_parser("get", parents=[conn], help="show one space").add_argument("name")

    colls = sub.add_parser("collections", help="collections").add_subparsers(dest="action", required=True)
    colls.add_parser("list", parents=[conn], help="list collections")
    p = colls.add_parser("create", parents=[conn], help="create a collection")
    p.add_argument("name")
    p.add_argument("--home-space", required=True)
    p.add_argument(
        "--index-spec",
        "--index",
        default="Flat",
        help="FAISS factory string (default: Flat), or 'auto' (with --recall): the index advisor chooses",
    )
    p.add_argument("--recall", type=float, default=0.0, help="with --index auto: the Recall@10 target, in (0, 1]")
    p.add_argument("--train-min-points", type=int, default=0, help="0 = the server's default for the spec")
    p.add_argument("--ef-construction", type=int, default=0, help="HNSW build candidate list (default 0: FAISS's 40)")
    p.add_argument(
        "--backend", default="", choices=["", "embedded", "milvus"], help="default: the server's (--backend)"
    )
    p.add_argument("--backend-uri", default="", help="milvus: http://host:19530 or a Milvus Lite file (*.db)")
    colls.add_parser("get", parents=[conn], help="show one collection").add_argument("name")
    p = colls.add_parser(
        "recommend", parents=[conn], help="measure index specs on a collection: the QPS/recall frontier and the choice"
    )
    p.add_argument("name")
    p.add_argument("--recall", type=float, required=True, help="the Recall@k target, in (0, 1]")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--queries", help=".npy of home-space queries (default: stored vectors held out of the sample)")
    p.add_argument("--sample-size", type=int, default=0, help="vectors to build on (default: all, at most 100000)")
    p.add_argument("--num-queries", type=int, default=0, help="held-out queries (default: min(1000, points/10))")
    p.add_argument("--candidates", nargs="+", default=[], metavar="SPEC", help="index specs to measure")
    colls.add_parser("delete", parents=[conn], help="delete a collection").add_argument("name")
    p = colls.add_parser(
        "move", parents=[conn], help="move an embedded collection to a Milvus engine while it serves, then switch it"
    )
    p.add_argument("name")
    p.add_argument(
        "--to",
        type=_engine_uri,
        default="",
        metavar="URI",
        help="milvus://HOST:PORT, http://HOST:PORT or a Milvus Lite file (*.db); default: the server's milvus uri",
    )

    p = sub.add_parser("ingest", parents=[conn], help="upsert vectors from a .npy file")
    p.add_argument("collection")
    p.add_argument("--space", required=True)
    p.add_argument("--vectors", required=True, help=".npy of shape (n, d), float16/32/64")
    p.add_argument("--ids", help="text file, one id per line (default: row numbers 0..n-1)")
    p.add_argument("--payloads", help="JSON lines, one per row (empty line: no payload)")
    p.add_argument(
        "--only-ids",
        metavar="FILE",
        help="upsert only the rows whose id (--ids, else the row number) is listed in FILE, one per line "
        "(e.g. from `migrations suggest --out`)",
    )
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stream", action="store_true", help="one UpsertStream call instead of one call per batch")

    p = sub.add_parser("search", parents=[conn], help="k-NN search with queries from a .npy file")
    p.add_argument("collection")
    p.add_argument("--space", required=True, help="space the queries were embedded in")
    p.add_argument("--vectors", required=True, help=".npy of shape (nq, d) or (d,)")
    p.add_argument("--rows", help="rows of the file to use: START:STOP or ROW (default: all)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--ef-search", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--k-factor", type=int, help="refine stage: k * k_factor candidates re-ranked")
    p.add_argument("--with-payload", action="store_true")

    p = sub.add_parser("stats", parents=[conn], help="state and counts of collections")
    p.add_argument("collection", nargs="?", help="one collection (default: all)")
    sub.add_parser("health", parents=[conn], help="print the server's health status")
    _snapshot_cli.add_parsers(sub, conn)
    _migration_cli.add_parsers(sub, conn)

    trs = sub.add_parser("transforms", help="compatibility transforms").add_subparsers(dest="action", required=True)
    trs.add_parser("list", parents=[conn], help="list transforms with their state and R@10")
    trs.add_parser("get", parents=[conn], help="show one transform and its report").add_argument("name")
    trs.add_parser("cancel", parents=[conn], help="cancel a transform's fit (queued or running)").add_argument("name")
    trs.add_parser("delete", parents=[conn], help="delete a transform no route or collection uses").add_argument("name")

    p = sub.add_parser("fit", parents=[conn], help="fit a transform from a new model's space into a home space")
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=list(KINDS))
    p.add_argument("--source-space", required=True, help="space of the new model's vectors")
    p.add_argument("--target-space", required=True, help="home space the transform maps into")
    p.add_argument("--doc-pairs", nargs=2, metavar=("NEW.npy", "HOME.npy"), help="row-aligned gallery items")
    p.add_argument("--query-pairs", nargs=2, metavar=("NEW.npy", "HOME.npy"), help="row-aligned logged queries")
    p.add_argument(
        "--eval-dir", help="folder with {old,new}_{doc,query}.npy to report on (query i's relevant doc is doc i)"
    )
    p.add_argument(
        "--relevance",
        metavar="diagonal|FILE.json|none",
        help="training relevance: 'diagonal' (query pair i's relevant doc is doc pair i, as in debdesc) or a JSON "
        "list with one list of doc-pair rows per query pair (e.g. logged clicks); without it the server trains on "
        "the old model's own top-1 doc per query (pseudo relevance); 'none' turns that off",
    )
    p.add_argument("--config", help="hyper-parameters as a JSON object, e.g. '{\"lam\": 12}'")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of pairs held out (default 0: 0.1)")
    p.add_argument("--chain", nargs="+", default=[], metavar="TRANSFORM", help="links of a --kind chain, in order")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-wait", action="store_true", help="return while the server fits")
    p.add_argument("--wait-timeout", type=float, help="seconds to wait for the fit (default: no limit)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--offline", metavar="OUT.npz", help="fit here without a server; write OUT.npz and OUT.json")
    p.add_argument("--home-metric", choices=list(METRICS), default="cosine", help="--offline: the target metric")
    p.add_argument("--source-metric", choices=list(METRICS), help="--offline: the source metric (default: home's)")

    routes = sub.add_parser("routes", help="query routes of a collection").add_subparsers(dest="action", required=True)
    routes.add_parser("list", parents=[conn], help="live routes and history").add_argument("collection")
    p = routes.add_parser("activate", parents=[conn], help="route a transform's source space into a collection")
    p.add_argument("collection")
    p.add_argument("transform")
    p.add_argument("--force", action="store_true", help="activate even when the report fails the gate")
    p.add_argument("--min-retention", type=float, help="gate: least transformed / home->home Recall@10")
    p.add_argument("--max-negative-flip-rate", type=float, help="gate: most negative-flip rate")
    p.add_argument(
        "--require-ecc", action=argparse.BooleanOptionalAction, default=None, help="gate: require ECC margin >= 0"
    )
    p = routes.add_parser("rollback", parents=[conn], help="restore the previous route from a query space")
    p.add_argument("collection")
    p.add_argument("query_space")
    p = routes.add_parser("shadow", parents=[conn], help="run a candidate transform in shadow, or --stop it")
    p.add_argument("collection")
    p.add_argument("query_space")
    p.add_argument("transform", nargs="?", help="the candidate (omit with --stop)")
    p.add_argument("--rate", type=float, default=1.0, help="fraction of live queries mirrored (default: 1)")
    p.add_argument("--stop", action="store_true", help="stop the route's shadow")
    return parser


def _engine_uri(text: str) -> str:
    """``collections move --to``: the engine's uri as the server takes it (``milvus://`` -> ``http://``)."""
    try:
        return milvus_uri(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of ``serve``: defaults < TOML < environment < flags (see ``_serve_config``)."""
    from ._serve_config import build_server_config as build  # imports interlingua.server

    return build(args)


def _ingest(client: Client, args: argparse.Namespace) -> None:
    xb = load_array(args.vectors, "vectors")
    if xb.ndim != 2:
        raise UsageError(f"vectors in {args.vectors} must have shape (n, d), got {xb.shape}")
    n = xb.shape[0]
    ids: Sequence[str] = read_lines(args.ids, n, "id") if args.ids else RowIds(n)
    payloads = None
    if args.payloads:
        payloads = [line if line.strip() else None for line in read_lines(args.payloads, n, "payload")]
    if args.only_ids:
        rows = select_rows(ids, read_id_list(args.only_ids), args.only_ids)
        xb, ids = xb[rows], [ids[i] for i in rows]
        payloads = None if payloads is None else [payloads[i] for i in rows]
        n = len(rows)
    upsert = client.upsert_stream if args.stream else client.upsert
    seq = upsert(
        args.collection,
        ids,
        xb,
        space=args.space,
        payloads=payloads,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(f"upserted {n} points into {args.collection} (sequence {seq})")


def _search(client: Client, args: argparse.Namespace) -> None:
    xq = load_array(args.vectors, "queries")
    xq = xq.reshape(1, -1) if xq.ndim == 1 else xq
    rows = parse_rows(args.rows, xq.shape[0])
    result = client.search(
        args.collection,
        np.asarray(xq[rows], dtype=np.float32),
        args.k,
        space=args.space,
        ef_search=args.ef_search,
        nprobe=args.nprobe,
        with_payload=args.with_payload,
        k_factor=args.k_factor,
    )
    print_search(result, rows.indices(xq.shape[0])[0], args.json, sys.stdout)


def _run_client(args: argparse.Namespace) -> int:
    target = args.target or os.environ.get("INTERLINGUA_TARGET") or "localhost:50051"
    api_key = args.api_key or os.environ.get("INTERLINGUA_API_KEY") or None
    out, cmd = sys.stdout, (args.command, getattr(args, "action", None))
    with Client(target, api_key=api_key, timeout=args.timeout) as client:
        if cmd == ("spaces", "list"):
            print_spaces(client.list_spaces(), args.json, out)
        elif cmd == ("spaces", "register"):
            space = client.register_space(args.name, args.dim, args.metric, args.description)
            print_spaces([space], args.json, out)
        elif cmd == ("spaces", "get"):
            print_spaces([client.get_space(args.name)], args.json, out)
        elif cmd == ("collections", "list"):
            print_collections(client.list_collections(), args.json, out)
        elif cmd == ("collections", "create"):
            info = client.create_collection(
                args.name,
                args.home_space,
                args.index_spec,
                args.train_min_points,
                ef_construction=args.ef_construction,
                target_recall=args.recall,
                backend=args.backend,
                backend_uri=args.backend_uri,
            )
            print_collection(info, args.json, out)
        elif cmd == ("collections", "recommend"):
            queries = load_array(args.queries, "queries") if args.queries else None
            rec = client.recommend_index(
                args.name,
                args.recall,
                args.k,
                None if queries is None else np.asarray(queries, dtype=np.float32),
                sample_size=args.sample_size,
                num_queries=args.num_queries,
                candidates=args.candidates,
            )
            print_recommendation(rec, args.json, out)
        elif cmd == ("collections", "get"):
            print_collection(client.get_collection(args.name), args.json, out)
        elif cmd == ("collections", "move"):
            print_move(client.move_collection(args.name, args.to), args.json, out)
        elif cmd == ("collections", "delete"):
            client.delete_collection(args.name)
            print(f"deleted collection {args.name}", file=out)
        elif args.command == "ingest":
            _ingest(client, args)
        elif args.command == "search":
            _search(client, args)
        elif args.command == "stats":
            infos = [client.get_collection(args.collection)] if args.collection else client.list_collections()
            print_collections(infos, args.json, out)
        elif args.command == "health":
            status = client.health()
            print(status, file=out)
            return 0 if status == "SERVING" else 1  # usable as a container health check
        elif cmd == ("transforms", "list"):
            print_transforms(client.list_transforms(), args.json, out)
        elif cmd == ("transforms", "get"):
            print_transform(client.get_transform(args.name), args.json, out)
        elif cmd == ("transforms", "cancel"):
            print_transform(client.cancel_fit(args.name), args.json, out)
        elif cmd == ("transforms", "delete"):
            deleted = client.delete_transform(args.name)
            if args.json:
                print_transform(deleted, True, out)
            else:
                print(f"deleted transform {deleted.name} (it was {deleted.state})", file=out)
        elif args.command == "fit":
            from ._fit_cli import fit_online

            fit_online(client, args)
        elif args.command == "routes":
            _routes(client, args)
        elif args.command in _snapshot_cli.COMMANDS:
            _snapshot_cli.run(client, args)
        elif args.command in _migration_cli.COMMANDS:
            _migration_cli.run(client, args)
    return 0


def _routes(client: Client, args: argparse.Namespace) -> None:
    out = sys.stdout
    if args.action == "list":
        print_routes_listing(client.list_routes(args.collection), args.json, out)
        return
    if args.action == "activate":
        route = client.activate_route(
            args.collection,
            args.transform,
            force=args.force,
            min_retention=args.min_retention,
            max_negative_flip_rate=args.max_negative_flip_rate,
            require_ecc=args.require_ecc,
        )
    elif args.action == "rollback":
        route = client.rollback_route(args.collection, args.query_space)
    else:
        if args.stop == bool(args.transform):
            raise UsageError("routes shadow needs a TRANSFORM or --stop (not both)")
        route = client.set_shadow(args.collection, args.query_space, args.transform, sample_rate=args.rate)
    print_routes([route], args.json, out)


def _serve(args: argparse.Namespace) -> None:
    from ._serve_config import ConfigError

    try:
        config = build_server_config(args)
    except ConfigError as err:
        raise UsageError(f"serve: {err}") from None
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pymilvus logs each failed call with a traceback (a ping a second while an engine is down); the
    # milvus backend reports what matters itself, once per change (server/backends/milvus_engines.py)
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    from interlingua.server import serve
    from interlingua.server.errors import InterlinguaError as Refused

    try:
        serve(config)
    except Refused as err:  # refused to start, e.g. --device cuda where faiss sees no GPU
        raise UsageError(f"serve: {err.message}") from None


def _restore(args: argparse.Namespace) -> None:
    from interlingua.server.errors import InterlinguaError as Refused

    try:
        _snapshot_cli.restore_offline(args)
    except Refused as err:  # a corrupt snapshot, or a server still running on the data dir
        raise UsageError(f"restore: {err.message}") from None
    except OSError as err:
        raise UsageError(f"restore: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit code (0 ok, 1 refused by the server, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "fit" and args.offline:
            from ._fit_cli import fit_offline  # imports the server's transforms

            fit_offline(args)
        elif args.command == "restore":
            _restore(args)
        else:
            return _run_client(args)
    except UsageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except InterlinguaError as err:
        print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
