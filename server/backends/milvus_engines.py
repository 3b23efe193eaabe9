"""The Milvus engines a server uses: one client per uri, its errors as gRPC codes, and its health.

:class:`MilvusEngines` opens one ``pymilvus.MilvusClient`` per engine uri on first use (pymilvus is
imported then, never at start: a server without the ``milvus`` extra serves embedded collections and
answers a ``milvus`` one with FAILED_PRECONDITION and the install hint). :meth:`MilvusEngines.call`
runs one engine call with the configured timeout and maps what the engine says:

- unreachable (connection refused, timeout, gRPC UNAVAILABLE / DEADLINE_EXCEEDED) -> ``Unavailable``
  naming the engine, and the engine is marked down at once;
- a collection the engine released (Milvus Lite forgets loads when it restarts) -> ``NotLoaded``,
  which :class:`~.milvus.MilvusCollection` answers by loading it and calling again;
- anything else the engine refuses -> ``FailedPrecondition`` naming the engine, the call and its reason.

A monitor thread pings every engine in use each ``check_seconds`` (``get_server_version``) and calls
``on_change`` when one goes down or comes back; the server's health service reports NOT_SERVING
while any is down (``app.py``). A Milvus Lite file uri runs its server inside this process (pymilvus
starts it); :meth:`close` stops it, so the files are closed when the engine closes. Covered by
``tests/test_backends.py`` (an engine killed and restarted under a serving front-end).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ..errors import FailedPrecondition, InterlinguaError, Unavailable
from .milvus_schema import require_pymilvus

__all__ = ["MilvusEngines", "NotLoaded"]

log = logging.getLogger(__name__)
R = TypeVar("R")

_CONNECT_CODES = {2}  #: pymilvus' "Fail connecting to server" (ErrorCode.UNEXPECTED_ERROR kin)
_UNREACHABLE_TEXT = ("fail connecting", "server unavailable", "retry timeout", "connection refused", "deadline")
_RPC_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class NotLoaded(Exception):
    """The engine holds the collection but has not loaded it (it restarted): load, then call again."""


class MilvusEngines:
    """Clients of the Milvus engines in use, their reachability and the monitor thread."""

    def __init__(self, timeout: float, check_seconds: float, on_change: Callable[[], None] | None = None) -> None:
        self.timeout = timeout
        self.check_seconds = check_seconds
        self.on_change = on_change or (lambda: None)
        self._clients: dict[str, Any] = {}
        self._down: dict[str, str] = {}  #: uri -> why it is down
        self._epoch: dict[str, int] = {}  #: uri -> +1 each time it comes back (collections reload)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------------

    def reachable(self) -> bool:
        """True when every engine in use answered its last call or ping."""
        return not self._down

    def down(self) -> dict[str, str]:
        """uri -> the reason, for each engine that is down."""
        return dict(self._down)

    def epoch(self, uri: str) -> int:
        """Changes each time the engine at ``uri`` comes back after being down."""
        return self._epoch.get(uri, 0)

    def _mark(self, uri: str, reason: str | None) -> None:
        with self._lock:
            if uri not in self._epoch:  # not (or no longer) watched: its state is nobody's health
                return
            was_down = uri in self._down
            if reason is None:
                self._down.pop(uri, None)
                if was_down:
                    self._epoch[uri] = self._epoch.get(uri, 0) + 1
            else:
                self._down[uri] = reason
        if was_down != (reason is not None):
            if reason is None:
                log.info("milvus engine %s is reachable again", uri)
            else:
                log.warning("milvus engine %s is unreachable: %s", uri, reason)
            self.on_change()

    # -- calls ---------------------------------------------------------------------------------

    def watch(self, uri: str) -> None:
        """Checks ``uri`` now and keeps checking it (the monitor thread starts with the first uri)."""
        with self._lock:
            new = uri not in self._epoch
            self._epoch.setdefault(uri, 0)
        if new:
            self.ping(uri)
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._loop, name="interlingua-milvus-health", daemon=True)
            self._monitor.start()

    def unwatch(self, uri: str) -> None:
        """Stops checking ``uri`` (no collection uses it any more: a failed creation, the last one dropped),
        so an engine nothing uses never holds the health service at NOT_SERVING."""
        with self._lock:
            self._epoch.pop(uri, None)
            was_down = self._down.pop(uri, None) is not None
        if was_down:
            self.on_change()

    def client(self, uri: str) -> Any:
        """The client of ``uri``, connected on first use; Unavailable while the engine cannot be reached."""
        c = self._clients.get(uri)
        if c is not None:
            return c
        pymilvus = require_pymilvus()
        try:
            c = pymilvus.MilvusClient(uri=uri, timeout=self.timeout)
        except Exception as e:
            raise self._unreachable(uri, "connect", e) from None
        with self._lock:
            if uri in self._clients:  # another thread connected meanwhile: keep one client
                other, c = c, self._clients[uri]
                other.close()
            else:
                self._clients[uri] = c
        return c

    def call(self, uri: str, what: str, fn: Callable[[Any], R]) -> R:
        """``fn(client)`` for the engine at ``uri``, its errors mapped (see the module docstring)."""
        if uri not in self._epoch:
            self.watch(uri)
        client = self.client(uri)
        try:
            result = fn(client)
        except InterlinguaError:  # raised by fn itself: already says what was wrong
            raise
        except Exception as e:
            if _is_unreachable(e):
                raise self._unreachable(uri, what, e) from None
            text = _message(e)
            if "released" in text or "not loaded" in text.lower():
                raise NotLoaded(text) from None
            raise FailedPrecondition(f"milvus engine at {uri}: {what} failed: {text}") from None
        if uri in self._down:
            self._mark(uri, None)
        return result

    def _unreachable(self, uri: str, what: str, e: BaseException) -> Unavailable:
        reason = _message(e)
        self._mark(uri, reason)
        return Unavailable(f"milvus engine at {uri} is unreachable ({what}: {reason}); retry when it is back")

    def ping(self, uri: str) -> bool:
        """One health check of ``uri``; True when it answered. Without pymilvus nothing is checked
        (requests answer FAILED_PRECONDITION with the install hint; the engine's health is unknown)."""
        try:
            self.client(uri)
        except FailedPrecondition:
            return False
        except Unavailable:
            return False
        try:
            self.call(uri, "ping", lambda c: c.get_server_version(timeout=min(self.timeout, 2.0)))
        except (Unavailable, FailedPrecondition) as e:
            if isinstance(e, FailedPrecondition):  # answered, but refused: it is up
                self._mark(uri, None)
                return True
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.check_seconds):
            for uri in list(self._epoch):
                if self._stop.is_set():
                    return
                if uri not in self._epoch:  # unwatched meanwhile
                    continue
                try:
                    self.ping(uri)
                except Exception:  # a bug in a ping must not end the monitor
                    log.exception("health check of milvus engine %s failed", uri)

    def close(self) -> None:
        """Stops the monitor and closes every client; a Milvus Lite server this process started stops too."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()
        with self._lock:
            clients, self._clients = self._clients, {}
        for uri, c in clients.items():
            try:
                c.close()
            except Exception:
                log.exception("closing the client of milvus engine %s failed", uri)
            if uri.endswith(".db") and "://" not in uri:
                try:
                    from milvus_lite import server_manager_instance

                    server_manager_instance.release_server(uri)
                except ImportError:
                    pass


def _message(e: BaseException) -> str:
    """One line of what the engine said."""
    msg = getattr(e, "message", None)
    if not isinstance(msg, str) or not msg:
        msg = e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else str(e)
    text = " ".join(str(msg).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _is_unreachable(e: BaseException) -> bool:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return e.code() in _RPC_DOWN
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    if getattr(e, "code", None) in _CONNECT_CODES:
        return True
    text = _message(e).lower()
    return any(t in text for t in _UNREACHABLE_TEXT)
