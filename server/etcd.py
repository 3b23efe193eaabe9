"""A small etcd v3 client over etcd's JSON gateway: the shared registry's store (``shared.py``).

etcd serves its v3 API as JSON over HTTP as well as gRPC (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/watch``, ``/v3/lease/*``; keys and values base64, 64-bit integers as strings), so the
registry needs no client library and no generated code. What it uses:

* :meth:`Etcd.range` / :meth:`Etcd.get`: keys with their ``mod_revision`` and the store's revision.
* :meth:`Etcd.txn`: one atomic transaction; the compare-and-swap helpers :meth:`Etcd.put_if`
  (``mod_revision`` equal, 0: the key must be absent) are built on it.
* :meth:`Etcd.watch`: a stream of the changes under a prefix from a revision on, each event in
  revision order; it returns (or raises) when the stream breaks, and the caller re-reads.
* leases: :meth:`Etcd.grant`, :meth:`Etcd.keepalive`, :meth:`Etcd.revoke` (the write lock's TTL).

Every call has a timeout; an endpoint that cannot be reached is tried after the next one, and when
none answers the call raises :class:`~.errors.Unavailable` naming them. Covered by
``tests/test_shared_registry.py`` against a real etcd.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument, Unavailable

__all__ = ["KV", "Etcd", "Event", "parse_registry_uri", "prefix_end"]


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class Event:
    """One change under a watched prefix: ``value`` is None for a deletion."""

    key: str
    value: bytes | None
    mod_revision: int


#: what a request on a kept connection that etcd (or a restart of it) closed meanwhile raises; a timeout
#: is not among them, so a request that may have been applied is never sent twice
_CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def parse_registry_uri(uri: str) -> tuple[list[str], str]:
    """``etcd://host:port[,host:port...]/prefix`` -> (["host:port", ...], "/prefix/"); ValueError when malformed."""
    p = urllib.parse.urlsplit(uri)
    if p.scheme != "etcd" or not p.netloc:
        raise ValueError(f"registry {uri!r} is not etcd://host:port[,host:port...]/prefix")
    endpoints = [e.strip() for e in p.netloc.split(",") if e.strip()]
    for e in endpoints:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"registry {uri!r}: endpoint {e!r} is not host:port")
    prefix = p.path.strip("/")
    if not prefix or any(not part for part in prefix.split("/")):
        raise ValueError(f"registry {uri!r} names no key prefix (etcd://host:port/interlingua)")
    return endpoints, f"/{prefix}/"


def prefix_end(prefix: str) -> str:
    """The end of etcd's range of keys starting with ``prefix`` (its last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _kv(d: dict[str, Any]) -> KV:
    return KV(
        base64.b64decode(d["key"]).decode(),
        base64.b64decode(d.get("value", "")),
        int(d.get("mod_revision", 0)),
        int(d.get("create_revision", 0)),
    )


class Etcd:
    """etcd v3 over its JSON gateway at ``endpoints`` ("host:port"), each call within ``timeout`` seconds."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise InvalidArgument("etcd needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._first = 0  #: the endpoint that answered last
        self._watching: http.client.HTTPConnection | None = None  #: the open watch stream (:meth:`abort_watch`)
        self._local = threading.local()  #: each thread's kept connections (:meth:`_kept`)
        self._all: set[http.client.HTTPConnection] = set()  #: every thread's, for :meth:`close`
        self._kept_lock = threading.Lock()

    # -- transport -----------------------------------------------------------------------------

    def _connect(self, endpoint: str, timeout: float | None) -> http.client.HTTPConnection:
        host, _, port = endpoint.rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=timeout)

    def _kept(self, j: int) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's kept connection to endpoint ``j`` (a new one: True), reused from call to call: a
        new connection per call doubled a put's cost (1.2 against 0.6 ms p50 here)."""
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(j)
        if conn is not None:
            return conn, False
        conn = conns[j] = self._connect(self.endpoints[j], self.timeout)
        with self._kept_lock:
            self._all.add(conn)
        return conn, True

    def _forget(self, j: int, conn: http.client.HTTPConnection) -> None:
        conn.close()
        del self._local.conns[j]
        with self._kept_lock:
            self._all.discard(conn)

    def close(self) -> None:
        """Closes every thread's kept connection (a call after it opens new ones)."""
        with self._kept_lock:
            conns, self._all = self._all, set()
        for conn in conns:
            conn.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            j = (self._first + i) % n
            while True:
                conn, new = self._kept(j)
                try:
                    conn.request("POST", path, data, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    text = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    self._forget(j, conn)
                    if not new and isinstance(e, _CLOSED):  # closed while idle (not a timeout): once more, anew
                        continue
                    errors.append(f"{self.endpoints[j]}: {type(e).__name__}: {e}")
                    break
                self._first = j
                out: dict[str, Any] = json.loads(text or b"{}")
                if resp.status != 200:
                    raise Unavailable(
                        f"etcd at {self.endpoints[j]} refused {path}: {resp.status} {out.get('error', text)!r}"
                    )
                return out
        raise Unavailable(f"etcd is unreachable ({'; '.join(errors)})")

    # -- keys ----------------------------------------------------------------------------------

    def range(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` with its value, and the store's revision they were read at."""
        out = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [_kv(d) for d in out.get("kvs", [])], int(out["header"]["revision"])

    def get(self, key: str) -> KV | None:
        out = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = out.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Writes ``key``; returns the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Deletes ``key`` (every key under it with ``prefix``); returns how many were deleted."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        return int(self._post("/v3/kv/deleterange", body).get("deleted", 0))

    def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], failure: Sequence[dict[str, Any]] = ()
    ) -> tuple[bool, int]:
        """One atomic transaction: (whether every compare held, the revision after it)."""
        out = self._post("/v3/kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        return bool(out.get("succeeded", False)), int(out["header"]["revision"])

    def txn_range(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], key: str
    ) -> tuple[bool, int, KV | None]:
        """:meth:`txn`, reading ``key`` too when it succeeds (one round trip): (succeeded, revision, kv)."""
        ops = [*success, {"request_range": {"key": _b64(key)}}]
        out = self._post("/v3/kv/txn", {"compare": compare, "success": ops, "failure": []})
        rev = int(out["header"]["revision"])
        if not out.get("succeeded", False):
            return False, rev, None
        kvs = out["responses"][-1]["response_range"].get("kvs", [])
        return True, rev, _kv(kvs[0]) if kvs else None

    @staticmethod
    def same_revision(key: str, mod_revision: int) -> dict[str, Any]:
        """Compare: ``key`` was last written at ``mod_revision`` (0: ``key`` does not exist)."""
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}

    @staticmethod
    def op_put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            op["lease"] = str(lease)
        return {"request_put": op}

    @staticmethod
    def op_delete(key: str, *, prefix: bool = False) -> dict[str, Any]:
        op = {"key": _b64(key)}
        if prefix:
            op["range_end"] = _b64(prefix_end(key))
        return {"request_delete_range": op}

    def put_if(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> tuple[bool, int]:
        """Compare-and-swap: writes ``key`` only if it was last written at ``mod_revision`` (0: only if absent)."""
        return self.txn([self.same_revision(key, mod_revision)], [self.op_put(key, value, lease)])

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        return int(self._post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renews ``lease``; returns its TTL (0: it had expired, keys under it are gone)."""
        out = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(out.get("result", out).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch ---------------------------------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, on_events: Callable[[list[Event]], None], stop: threading.Event
    ) -> None:
        """Streams the changes under ``prefix`` from ``start_revision`` into ``on_events``, one call per
        batch in revision order, until ``stop`` is set (returns) or the stream breaks (raises
        :class:`Unavailable`; the caller re-reads the prefix, then watches again from the revision read).
        A stream is quiet while nothing changes, so a silent etcd is found by the caller's lease
        keep-alives, which then end the stream with :meth:`abort_watch`."""
        errors = []
        for endpoint in [*self.endpoints[self._first :], *self.endpoints[: self._first]]:
            conn = self._connect(endpoint, self.timeout)
            try:
                body = {
                    "create_request": {
                        "key": _b64(prefix),
                        "range_end": _b64(prefix_end(prefix)),
                        "start_revision": str(start_revision),
                    }
                }
                conn.request("POST", "/v3/watch", json.dumps(body).encode(), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise ConnectionError(f"etcd refused the watch: HTTP {resp.status}")
                if conn.sock is not None:
                    conn.sock.settimeout(None)  # quiet while nothing changes (see above)
                self._watching = conn
                if stop.is_set():
                    return
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{endpoint}: {type(e).__name__}: {e}")
                conn.close()
                continue
            try:  # streaming: a break now ends the watch (events up to it were delivered); on_events' errors pass
                self._stream(resp, on_events, stop)
                return
            except (OSError, http.client.HTTPException) as e:
                if stop.is_set():
                    return
                raise Unavailable(f"the etcd watch at {endpoint} broke: {type(e).__name__}: {e}") from None
            finally:
                self._watching = None
                conn.close()
        raise Unavailable(f"the etcd watch could not start ({'; '.join(errors)})")

    def abort_watch(self) -> None:
        """Ends the open watch stream (its :meth:`watch` raises, or returns once ``stop`` is set)."""
        conn = self._watching
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _lines(resp: http.client.HTTPResponse) -> Iterator[bytes]:
        while True:
            line = resp.readline()
            if not line:
                raise ConnectionError("etcd closed the watch stream")
            if line.strip():
                yield line

    def _stream(
        self, resp: http.client.HTTPResponse, on_events: Callable[[list[Event]], None], stop: threading.Event
    ) -> None:
        for line in self._lines(resp):
            if stop.is_set():
                return
            try:
                msg = json.loads(line)
            except ValueError:
                raise ConnectionError(f"etcd sent a watch message that is not JSON: {line[:200]!r}") from None
            if "error" in msg:
                raise ConnectionError(f"etcd ended the watch: {msg['error']}")
            result = msg.get("result", {})
            if result.get("canceled") or result.get("compact_revision"):
                raise ConnectionError(f"etcd cancelled the watch: {result.get('cancel_reason', 'compacted')}")
            events = [
                Event(
                    base64.b64decode(e["kv"]["key"]).decode(),
                    None if e.get("type") == "DELETE" else base64.b64decode(e["kv"].get("value", "")),
                    int(e["kv"].get("mod_revision", 0)),
                )
                for e in result.get("events", [])
            ]
            if events:
                on_events(events)
