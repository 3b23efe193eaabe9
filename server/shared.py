"""The shared registry: several front-ends serving the same Milvus collections through one etcd.

A front-end started with ``registry = "etcd://host:2379/<prefix>"`` keeps its own SQLite store as
before and mirrors into it what every front-end of the prefix shares (``docs/ARCHITECTURE.md``,
"Several front-ends on one engine")::

    <prefix>/spaces/<name>              a space (JSON): created once, compare-and-swap on absence
    <prefix>/transforms/<name>          a ready transform's row (JSON, no weights) and its weights' sha256
    <prefix>/weights/<name>/<sha>/<i>   its weights in chunks under etcd's request limit, written first
    <prefix>/collections/<name>         a milvus collection's spec: any front-end can serve it
    <prefix>/routes/<collection>        the collection's whole route table, one JSON value
    <prefix>/migrations/<collection>    its migration's record (phase, transforms, calibration), and
                                        whether a cutover's index switch is running
    <prefix>/locks/<collection>         the write lock (a lease), held for one write batch
    <prefix>/writes/<collection>        the last writer: others count the collection again
    <prefix>/keys/<collection>          the next free primary key: front-ends reserve blocks of keys

**Atomic activation.** A route change (activate, roll back, shadow) writes the new table in one etcd
transaction that compares the key's ``mod_revision`` with the one this front-end last applied: of
two front-ends changing a table at once one wins, the other gets FAILED_PRECONDITION and nothing
changed. Every front-end watches the prefix and swaps its in-memory table in one reference
(``Routes.replace``), so a search sees the old table or the new one, never a mix.

**Writes.** The milvus backend's read-merge-write needs one writer per collection: each write batch
holds ``locks/<collection>`` (created only if absent, under this front-end's lease, so a crashed
holder's lock expires), and on release records itself in ``writes/<collection>``; a front-end that
sees another writer there forgets its counts and counts again.

**Health.** The registry is in sync once it has read the whole prefix and is watching from the
revision read; while the watch is broken (etcd down, a keep-alive failed) :attr:`in_sync` is False
and the health service reports NOT_SERVING; route changes are then UNAVAILABLE. It re-reads and
resumes by itself. **Migrations** of shared collections: the front-end that receives a phase change
writes the record with a compare-and-swap, then changes its own state; the others follow it
(``migration/follow.py``), holding their requests while the leader's cutover switches the new field's
index, and reopening the collection with the new home at FinishMigration (one transaction: record,
collection spec, route table). Not shared: embedded collections and their routes, metrics. Covered by
``tests/test_shared_registry.py`` with a real etcd and two front-ends
on one Milvus Lite server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.milvus import MilvusCollection
from .collection_spec import CollectionSpec
from .errors import AlreadyExists, FailedPrecondition, Unavailable
from .etcd import KV, Etcd, Event, parse_registry_uri
from .migration import follow
from .migration.runtime import MigrationRecord
from .store import CollectionRow, SpaceRow, TransformRow

if TYPE_CHECKING:
    from .engine import Engine
    from .migration.manager import Migrations

__all__ = ["CHUNK_BYTES", "LEASE_TTL", "SharedRegistry"]

log = logging.getLogger(__name__)

LEASE_TTL = 10  #: seconds a crashed front-end's write lock outlives it
KEY_BLOCK = 16384  #: primary keys a front-end reserves at a time (``milvus_table.py``, "Keys")
CHUNK_BYTES = 512 * 1024  #: transform weights per etcd value (etcd takes requests up to 1.5 MiB; base64 adds 1/3)
_SPACE_FIELDS = ("name", "dim", "metric", "description", "created_at")
JSON_KINDS = ("spaces", "transforms", "collections", "routes", "migrations")  #: the keys whose values are JSON
LEASE_GONE = "requested lease not found"  #: etcd's answer to a write under an expired lease


class SharedRegistry:
    """One front-end's view of a shared registry (module docstring); :meth:`start` syncs and watches."""

    def __init__(self, engine: Engine, uri: str, timeout: float) -> None:
        endpoints, self.prefix = parse_registry_uri(uri)
        self.uri = uri
        self.etcd = Etcd(endpoints, timeout)
        self.engine = engine
        self.id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"  #: this front-end
        self.in_sync = False
        self.error = "not read yet"  #: why not in sync
        #: collection -> (mod_revision, entries) of the route table this front-end applied last
        self.tables: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}
        self.unpublished: set[str] = set()  #: transforms fitted here that the registry does not have yet
        self.deleting: set[str] = set()  #: transforms this front-end is deleting (``Engine.delete_transform``)
        self.lease = 0
        self._last_write: dict[str, int] = {}  #: collection -> revision of this front-end's last write
        self._keys: dict[str, tuple[int, int]] = {}  #: collection -> its keys reserved here and unused [from, to)
        #: collection -> mod_revision of its migration record as this front-end applied it (0: none)
        self.mig_rev: dict[str, int] = {}
        self._mig_seen: dict[str, int] = {}  #: collection -> the last revision of its record handled here
        #: held by a commit of a migration record from its etcd call until it is marked seen, and by the
        #: watch's check of an event against it: a front-end never follows its own change
        self._mig_lock = threading.Lock()
        self._first_sync = True
        #: this data dir has been synced with this registry before: what it lacks was deleted elsewhere,
        #: except the transforms fitted here and not published yet (kept in the marker across a crash)
        self._marker = Path(engine.config.data_dir) / "registry.json"
        try:
            marker = json.loads(self._marker.read_text()) if self._marker.exists() else {}
        except (OSError, ValueError) as e:  # never keeps the server from starting: joins afresh
            log.warning("%s is unreadable (%s); this data dir joins the registry as new", self._marker, e)
            marker = {}
        self._joined = marker.get("uri") == uri
        if self._joined:
            self.unpublished.update(marker.get("unpublished", []))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}/{name}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Syncs and watches in the background (health is NOT_SERVING until the first sync)."""
        assert self.engine.compat is not None
        self.engine.compat.on_stored.append(self.publish_transform)
        for col in self.engine.collections.values():
            if isinstance(col, MilvusCollection):
                self.hook(col)
        for target, name in ((self._run, "registry-watch"), (self._keepalive, "registry-keepalive")):
            t = threading.Thread(target=target, name=f"interlingua-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        self.etcd.abort_watch()
        for t in self._threads:
            t.join(5)
        if self.lease:
            with contextlib.suppress(Unavailable):
                self.etcd.revoke(self.lease)
        self.etcd.close()

    def _set_sync(self, ok: bool, why: str = "") -> None:
        changed = ok != self.in_sync
        self.in_sync, self.error = ok, why
        self.engine.metrics.registry_in_sync.set(1.0 if ok else 0.0)
        if changed:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "shared registry %s: %s",
                self.uri,
                "in sync" if ok else f"out of sync: {why}",
            )
            self.engine._health_changed()

    def require_sync(self) -> None:
        if not self.in_sync:
            raise Unavailable(f"the shared registry {self.uri} is not in sync ({self.error}); retry")

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                kvs, rev = self.etcd.range(self.prefix)
                self._sync(kvs)
                self._set_sync(True)
                backoff = 0.05
                self.etcd.watch(self.prefix, rev + 1, self._on_events, self._stop)
            except Exception as e:  # etcd gone, or an apply failed: re-read from scratch
                if self._stop.is_set():
                    return
                why = e.message if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
                if not isinstance(e, Unavailable):
                    log.exception("applying the shared registry failed")
                self._set_sync(False, why)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, 2.0)

    def _keepalive(self) -> None:
        """Renews the lease and probes etcd once a second: a silent etcd ends the watch (NOT_SERVING)."""
        while not self._stop.wait(1.0):
            try:
                if self.lease and self.etcd.keepalive(self.lease) == 0:
                    self.lease = 0  # expired: the next write takes a new one
                elif not self.lease:
                    self.etcd.range(self.key("spaces", "\x00"))  # a cheap read
            except Unavailable as e:
                if LEASE_GONE in e.message:  # etcd answered: the lease expired (a long pause, say)
                    self.lease = 0
                    continue
                if self.in_sync:
                    self._set_sync(False, e.message)
                    self.etcd.abort_watch()

    # -- reading the registry ------------------------------------------------------------------

    def _split(self, key: str) -> tuple[str, str]:
        kind, _, name = key[len(self.prefix) :].partition("/")
        return kind, name

    def _sync(self, kvs: list[KV]) -> None:
        """Applies a whole read of the prefix: what the registry has is added or replaced here; what
        this front-end has and the registry lacks is published when this data dir first joins the
        registry, and otherwise removed here (another front-end deleted it meanwhile), but for the
        transforms fitted here whose publication has not succeeded yet (:attr:`unpublished`)."""
        by: dict[str, dict[str, KV]] = {}
        vals: dict[str, dict[str, Any]] = {}  #: kind -> name -> the JSON value (malformed ones left out)
        for kv in kvs:
            kind, name = self._split(kv.key)
            by.setdefault(kind, {})[name] = kv
            if kind in JSON_KINDS:
                with self._malformed(kv.key):
                    vals.setdefault(kind, {})[name] = json.loads(kv.value)
        e, first = self.engine, self._first_sync
        spaces = vals.get("spaces", {})
        for name, d in sorted(spaces.items(), key=lambda t: str(t[1].get("created_at", ""))):
            with self._malformed(self.key("spaces", name)):
                self._apply_space(d)
        for name, row in list(e.spaces.items()):
            if name not in spaces:
                try:
                    self.publish_space(row)
                except AlreadyExists as err:  # registered meanwhile with another definition
                    log.error("%s; this front-end keeps its own", err.message)
        heads = vals.get("transforms", {})
        for name, head in sorted(
            heads.items(), key=lambda t: (t[1].get("kind") == "chain", str(t[1].get("created_at")))
        ):
            with self._malformed(self.key("transforms", name)):
                self._apply_transform(name, head)
        assert e.compat is not None
        for name, rec in list(e.compat.transforms.items()):
            if rec.state == "ready" and name not in heads:
                if (first and not self._joined) or name in self.unpublished:
                    self.publish_transform(name)
                else:
                    self._remove_transform(name)
        cols = by.get("collections", {})
        for name, d in vals.get("collections", {}).items():
            with self._malformed(self.key("collections", name)):
                self._attach(name, d)
        for name, col in list(e.collections.items()):
            if isinstance(col, MilvusCollection) and name not in cols and name not in e.moving:
                if first and not self._joined:
                    try:
                        self.publish_collection(col.row)
                    except AlreadyExists as err:
                        log.error("%s; this front-end's collection of that name is not shared", err.message)
                else:
                    self._detach(name)
        migrations = {n: (d, by["migrations"][n].mod_revision) for n, d in vals.get("migrations", {}).items()}
        self._sync_migrations(migrations)
        routes = by.get("routes", {})
        for name, col in list(e.collections.items()):
            if not isinstance(col, MilvusCollection):
                continue
            table = routes.get(name)
            if table is None and first and not self._joined and col.routes:
                self._publish_table(col)
            elif table is None or name in vals.get("routes", {}):
                with self._malformed(self.key("routes", name)):
                    entries = vals["routes"][name] if table else {}
                    self._apply_routes(name, entries, table.mod_revision if table else 0, force=True)
            with col.lock:
                col.forget_counts()  # writes may have been missed
        self._joined = True
        self._save_marker()
        self._first_sync = False

    @contextlib.contextmanager
    def _malformed(self, key: str) -> Iterator[None]:
        """Skips a registry value this front-end cannot read (not JSON, a field missing or of the wrong
        type: written by another tool or version), logging it, so that one bad key does not keep the
        front-end out of sync; an unreachable etcd (UNAVAILABLE) still ends the sync."""
        try:
            yield
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.error("shared registry %s: %s cannot be read here (%s: %s); skipped", self.uri, key,
                      type(err).__name__, err)  # fmt: skip

    def _save_marker(self) -> None:
        tmp = self._marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"uri": self.uri, "front_end": self.id, "unpublished": sorted(self.unpublished)}))
        os.replace(tmp, self._marker)

    def _on_events(self, events: list[Event]) -> None:
        rehomed = set()  # collections a FinishMigration reopened: their migration's deletion is part of it
        for ev in events:
            kind, name = self._split(ev.key)
            if kind == "collections" and ev.value is not None:
                col = self.engine.collections.get(name)
                with self._malformed(ev.key):
                    if col is not None and json.loads(ev.value)["spec"]["home_space"] != col.home.name:
                        rehomed.add(name)
        for ev in events:
            with self._malformed(ev.key):
                self._on_event(ev, rehomed)

    def _on_event(self, ev: Event, rehomed: set[str]) -> None:
        """One change under the prefix (``_on_events``: in revision order)."""
        kind, name = self._split(ev.key)
        value = None if kind not in JSON_KINDS or ev.value is None else json.loads(ev.value)
        if kind == "spaces" and value is not None:
            self._apply_space(value)
        elif kind == "transforms":
            if value is None:
                self._remove_transform(name)
            else:
                self._apply_transform(name, value)
        elif kind == "collections":
            if value is None:
                self._detach(name)
            else:
                self._attach(name, value)
        elif kind == "routes" and value is not None:
            self._apply_routes(name, value, ev.mod_revision)
        elif kind == "migrations":
            with self._mig_lock:  # after a commit of this front-end's own that is still running
                if ev.mod_revision <= self._mig_seen.get(name, 0):
                    return  # this front-end's own change (or one applied by a full read)
                self._mig_seen[name] = ev.mod_revision
                self.mig_rev[name] = ev.mod_revision if value is not None else 0
            if value is not None:
                rec = MigrationRecord.from_dict(value["record"])
                follow.adopt(self._migrations(), name, rec, value["switching"])
            elif name not in rehomed:
                follow.forget(self._migrations(), name)
        elif kind == "writes" and ev.value is not None and ev.value.decode() != self.id:
            col = self.engine.collections.get(name)
            if isinstance(col, MilvusCollection):
                with col.lock:  # not in the middle of a write's count update
                    col.forget_counts()

    # -- spaces --------------------------------------------------------------------------------

    def publish_space(self, row: SpaceRow) -> None:
        """Registers ``row`` in the registry unless there; AlreadyExists if it is there with another definition."""
        value = json.dumps({f: getattr(row, f) for f in _SPACE_FIELDS}).encode()
        ok, _ = self.etcd.put_if(self.key("spaces", row.name), value, 0)
        if not ok:
            kv = self.etcd.get(self.key("spaces", row.name))
            d = json.loads(kv.value) if kv else {}
            if (d.get("dim"), d.get("metric")) != (row.dim, row.metric):
                raise AlreadyExists(
                    f"space {row.name!r} is already registered in the shared registry {self.uri} as {d.get('dim')}"
                    f" dims, {d.get('metric')}"
                )

    def _apply_space(self, d: dict[str, Any]) -> None:
        e = self.engine
        row = SpaceRow(**{f: d[f] for f in _SPACE_FIELDS})
        with e._registry_lock:
            have = e.spaces.get(row.name)
            if have is None:
                assert e.store is not None
                e.store.add_space(row)
                e.spaces[row.name] = row
            elif (have.dim, have.metric) != (row.dim, row.metric):
                log.error(
                    "space %s differs here (%d, %s) from the shared registry's (%d, %s); this front-end keeps its own",
                    row.name,
                    have.dim,
                    have.metric,
                    row.dim,
                    row.metric,
                )

    # -- transforms ----------------------------------------------------------------------------

    def publish_transform(self, name: str) -> None:
        """Publishes stored transform ``name`` (weights first, then its head); kept for the next sync
        when etcd cannot be reached."""
        assert self.engine.store is not None
        row = self.engine.store.transform(name)
        if row is None:
            return
        if name not in self.unpublished:
            self.unpublished.add(name)
            self._save_marker()  # a crash before it is published: published at the next start
        sha = hashlib.sha256(row.weights).hexdigest()
        chunks = [row.weights[i : i + CHUNK_BYTES] for i in range(0, len(row.weights), CHUNK_BYTES)] or [b""]
        head = {k: v for k, v in dataclasses.asdict(row).items() if k != "weights"}
        head.update(sha256=sha, chunks=len(chunks))
        try:
            for i, chunk in enumerate(chunks):
                self.etcd.put(self.key("weights", f"{name}/{sha[:16]}/{i}"), chunk)
            ok, _ = self.etcd.put_if(self.key("transforms", name), json.dumps(head).encode(), 0)
        except Unavailable as e:
            log.warning("transform %s is not in the shared registry yet: %s", name, e.message)
            return
        self.unpublished.discard(name)
        self._save_marker()
        if not ok:
            log.error("transform %s was published by another front-end too; the registry keeps the first", name)

    def unpublish_transform(self, name: str) -> None:
        """Deletes ``name`` from the registry; this front-end's own watch then leaves it to the caller."""
        self.require_sync()
        self.deleting.add(name)
        self.etcd.txn(
            [],
            [
                self.etcd.op_delete(self.key("transforms", name)),
                self.etcd.op_delete(self.key("weights", f"{name}/"), prefix=True),
            ],
        )

    def _apply_transform(self, name: str, head: dict[str, Any]) -> None:
        compat = self.engine.compat
        assert compat is not None
        have = compat.transforms.get(name)
        if have is not None and have.state != "failed":
            if have.checksum != head["checksum"]:
                log.error("transform %s differs here from the shared registry's; this front-end keeps its own", name)
            return
        kvs, _ = self.etcd.range(self.key("weights", f"{name}/{head['sha256'][:16]}/"))
        parts = {int(kv.key.rsplit("/", 1)[1]): kv.value for kv in kvs}
        weights = b"".join(parts[i] for i in range(head["chunks"]) if i in parts)
        if len(parts) != head["chunks"] or hashlib.sha256(weights).hexdigest() != head["sha256"]:
            raise Unavailable(f"transform {name!r}'s weights in the registry are incomplete; reading again")
        fields = {f.name: head[f.name] for f in dataclasses.fields(TransformRow) if f.name != "weights"}
        with compat.lock:
            if name not in compat.transforms or compat.transforms[name].state == "failed":
                compat.adopt(TransformRow(**fields, weights=weights))

    def _remove_transform(self, name: str) -> None:
        e, compat = self.engine, self.engine.compat
        assert compat is not None
        with compat.lock:
            rec = compat.transforms.get(name)
            if rec is None or rec.state != "ready" or name in self.deleting:
                return
            users = e.transform_users(name)
            if users:
                log.warning(
                    "transform %s was deleted from the shared registry; kept here for %s", name, ", ".join(users)
                )
                return
            compat.forget(name)

    # -- collections ---------------------------------------------------------------------------

    @staticmethod
    def _collection_value(spec: CollectionSpec, created_at: float) -> bytes:
        """A collection's value under ``collections/<name>``, as :meth:`_attach` reads it."""
        return json.dumps({"spec": dataclasses.asdict(spec), "created_at": created_at}).encode()

    def publish_collection(self, row: CollectionRow) -> None:
        """Registers a milvus collection, with the next of its primary keys this front-end's store would
        hand out (:meth:`take_keys` goes on from there); AlreadyExists if another front-end registered the name."""
        assert self.engine.store is not None
        name, keys = row.spec.name, self.engine.store.keys_used(row.cid)
        ok, _ = self.etcd.txn(
            [self.etcd.same_revision(self.key("collections", name), 0)],
            [
                self.etcd.op_put(self.key("collections", name), self._collection_value(row.spec, row.created_at)),
                self.etcd.op_put(self.key("keys", name), str(keys).encode()),
            ],
        )
        if not ok:
            raise AlreadyExists(f"collection {row.spec.name!r} already exists in the shared registry {self.uri}")

    def exists(self, name: str) -> bool:
        return self.etcd.get(self.key("collections", name)) is not None

    def unpublish_collection(self, name: str) -> None:
        self.require_sync()
        self._keys.pop(name, None)
        kinds = ("collections", "routes", "migrations", "locks", "writes", "keys")
        self.etcd.txn([], [self.etcd.op_delete(self.key(kind, name)) for kind in kinds])

    def _attach(self, name: str, d: dict[str, Any]) -> None:
        e, spec = self.engine, CollectionSpec(**d["spec"])
        have = e.collections.get(name)
        if isinstance(have, MilvusCollection) and have.uri == spec.backend_uri and have.home.name != spec.home_space:
            follow.adopt_finish(self._migrations(), name, spec.home_space)  # FinishMigration elsewhere
            return
        with e._ddl_lock, e._registry_lock:
            have = e.collections.get(name)
            if have is not None:
                if not isinstance(have, MilvusCollection) or have.uri != spec.backend_uri:
                    log.error(
                        "collection %s of the shared registry (%s) is another one here; not attached",
                        name,
                        spec.backend_uri,
                    )
                return
            assert e.store is not None
            row = e.store.add_collection(spec)
            home, basis = e.spaces[spec.home_space], e.loaded_basis(spec.basis_transform)
            col = MilvusCollection(row, home, e.spaces, e.store, e.milvus, e.metrics, basis=basis)
            self.hook(col)
            e.collections[name] = col
        log.info("attached collection %s from the shared registry", name)

    def _detach(self, name: str) -> None:
        e = self.engine
        with e._ddl_lock, e._registry_lock:
            col = e.collections.get(name)
            if not isinstance(col, MilvusCollection) or name in e.moving:
                return
            del e.collections[name]
            with col.lock:  # after a write in progress
                col.detach()
                self._keys.pop(name, None)  # a collection of that name created again has keys of its own
        self.tables.pop(name, None)
        e._unwatch_unused(col.uri)
        log.info("detached collection %s: deleted in the shared registry", name)

    def hook(self, col: MilvusCollection) -> None:
        """Makes ``col``'s writes take the shared write lock, and its new points' keys from the registry."""
        col.writing = functools.partial(self.writing, col)
        col.take_keys = functools.partial(self.take_keys, col)

    def take_keys(self, col: MilvusCollection, n: int) -> int:
        """The first of ``n`` primary keys for ``col``'s new points, from a block this front-end reserved
        in ``keys/<collection>`` (a compare-and-swap per :data:`KEY_BLOCK` keys, before the engine write
        uses them: no key is handed out twice, a crash leaves a gap). A collection registered without the
        key (none should be) starts past every key its engine holds."""
        start, end = self._keys.get(col.name, (0, 0))
        if end - start < n:
            key, want = self.key("keys", col.name), max(n, KEY_BLOCK)
            while True:
                kv = self.etcd.get(key)
                if kv is not None:
                    start = int(kv.value)
                else:
                    col.check_keys()  # (the store's counter, moved past the engine's keys)
                    assert self.engine.store is not None
                    start = self.engine.store.keys_used(col.row.cid)
                ok, _ = self.etcd.put_if(key, str(start + want).encode(), kv.mod_revision if kv else 0)
                if ok:
                    break
            end = start + want
        self._keys[col.name] = (start + n, end)
        return start

    # -- routes --------------------------------------------------------------------------------

    def commit_route(self, col: MilvusCollection, query_space: str, change: dict[str, Any] | None) -> None:
        """Writes the collection's table with ``change`` merged into ``query_space``'s entry (None:
        removed) if nobody changed it since this front-end applied it; the caller holds the routes' lock
        and applies the change here after."""
        self.require_sync()
        rev, entries = self.tables.get(col.name, (0, {}))
        new = dict(entries)
        if change is None:
            new.pop(query_space, None)
        else:
            new[query_space] = {**entries.get(query_space, {}), **change}
        ok, now = self.etcd.put_if(self.key("routes", col.name), json.dumps(new).encode(), rev)
        if not ok:
            raise FailedPrecondition(
                f"the route table of collection {col.name!r} was changed by another front-end since this one read "
                "it; read the routes again and retry"
            )
        self.tables[col.name] = (now, new)

    def _publish_table(self, col: MilvusCollection) -> None:
        entries = {
            qs: {
                "transform": r.transform,
                "forced": False,
                "shadow": r.shadow.transform if r.shadow else "",
                "shadow_rate": r.shadow.sample_rate if r.shadow else 0.0,
            }
            for qs, r in col.routes.items()
        }
        ok, rev = self.etcd.put_if(self.key("routes", col.name), json.dumps(entries).encode(), 0)
        if ok:
            self.tables[col.name] = (rev, entries)

    def _apply_routes(self, name: str, entries: dict[str, Any], rev: int, *, force: bool = False) -> None:
        e = self.engine
        col = e.collections.get(name)
        if not isinstance(col, MilvusCollection) or e.routes is None:
            return
        with e.routes._lock:
            if not force and self.tables.get(name, (0, {}))[0] >= rev:
                return  # this front-end's own change, applied when it was made
            e.routes.replace(col, entries)
            self.tables[name] = (rev, entries)

    # -- migrations ----------------------------------------------------------------------------

    def _migrations(self) -> Migrations:
        assert self.engine.migrations is not None
        return self.engine.migrations

    def commit_migration(self, name: str, rec: MigrationRecord | None, *, switching: bool = False) -> None:
        """Writes the migration record of collection ``name`` (None: deletes it) if nobody changed it since
        this front-end applied it; FAILED_PRECONDITION otherwise, nothing changed. ``switching``: the
        cutover's index switch is running (the other front-ends hold their requests, ``follow_switch``)."""
        self.require_sync()
        with self._mig_lock:  # the watch meets this change's event after it is marked seen here
            key, rev = self.key("migrations", name), self.mig_rev.get(name, 0)
            if rec is None:
                ok, now = self.etcd.txn([self.etcd.same_revision(key, rev)], [self.etcd.op_delete(key)])
            else:
                value = json.dumps({"record": rec.to_dict(), "switching": switching}).encode()
                ok, now = self.etcd.put_if(key, value, rev)
            if not ok:
                raise FailedPrecondition(
                    f"the migration of collection {name!r} was changed by another front-end since this one read "
                    "it; read it again and retry"
                )
            self.mig_rev[name] = now if rec is not None else 0
            self._mig_seen[name] = now

    def commit_finish(self, col: MilvusCollection, new_space: str, reverse: str) -> None:
        """FinishMigration in one transaction: the record goes, the collection's spec names ``new_space`` as
        home, and its route table becomes the reverse transform's route from the old home (or none), as
        ``Store.rehome_collection`` does locally; FAILED_PRECONDITION if the record or table changed meanwhile."""
        self.require_sync()
        name, old = col.name, col.home.name
        mkey, rkey = self.key("migrations", name), self.key("routes", name)
        entries = {old: {"transform": reverse, "forced": False, "shadow": "", "shadow_rate": 0.0}} if reverse else {}
        value = self._collection_value(dataclasses.replace(col.row.spec, home_space=new_space), col.row.created_at)
        assert self.engine.routes is not None
        with self._mig_lock, self.engine.routes._lock:  # neither the record nor the table followed as another's
            ok, now = self.etcd.txn(
                [self.etcd.same_revision(mkey, self.mig_rev.get(name, 0)),
                 self.etcd.same_revision(rkey, self.tables.get(name, (0, {}))[0])],
                [self.etcd.op_delete(mkey), self.etcd.op_put(self.key("collections", name), value),
                 self.etcd.op_put(rkey, json.dumps(entries).encode())],
            )  # fmt: skip
            if not ok:
                raise FailedPrecondition(
                    f"the migration or the routes of collection {name!r} were changed by another front-end since "
                    "this one read them; read them again and retry"
                )
            self.mig_rev[name], self._mig_seen[name], self.tables[name] = 0, now, (now, entries)

    def _sync_migrations(self, records: dict[str, tuple[dict[str, Any], int]]) -> None:
        migs = self._migrations()
        for name, col in list(self.engine.collections.items()):
            if not isinstance(col, MilvusCollection):
                continue
            got = records.get(name)
            if got is not None:
                value, rev = got
                with self._mig_lock:
                    self.mig_rev[name] = self._mig_seen[name] = rev
                follow.adopt(migs, name, MigrationRecord.from_dict(value["record"]), value["switching"])
            elif name in migs.active:
                self.mig_rev[name] = 0
                if self._joined:
                    follow.forget(migs, name)
                else:  # joining: this front-end's migration is the registry's
                    self.commit_migration(name, migs.active[name].rec)

    # -- writes --------------------------------------------------------------------------------

    def _lease(self) -> int:
        if not self.lease:
            self.lease = self.etcd.grant(LEASE_TTL)
        return self.lease

    @contextlib.contextmanager
    def writing(self, col: MilvusCollection) -> Iterator[None]:
        """Holds the collection's write lock in etcd for one write batch (the caller holds its local one)."""
        lock, writes = self.key("locks", col.name), self.key("writes", col.name)
        deadline, pause = time.monotonic() + self.etcd.timeout, 0.002
        while True:
            lease = self._lease()
            try:
                ok, _, got = self.etcd.txn_range(
                    [self.etcd.same_revision(lock, 0)], [self.etcd.op_put(lock, self.id.encode(), lease)], writes
                )
            except Unavailable as e:
                if LEASE_GONE not in e.message:
                    raise
                self.lease, ok = 0, False  # expired: a new one at the next try
            if ok:
                break
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"collection {col.name!r} is being written by another front-end for over {self.etcd.timeout:g}s;"
                    " retry"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        if got is not None and got.mod_revision != self._last_write.get(col.name):
            col.forget_counts()  # another front-end wrote since: count again
        try:
            yield
        finally:
            _, rev = self.etcd.txn([], [self.etcd.op_put(writes, self.id.encode()), self.etcd.op_delete(lock)])
            self._last_write[col.name] = rev
