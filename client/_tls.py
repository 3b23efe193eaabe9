"""TLS for the client's channel: a small explicit config, ``Client(target, tls=TLS(...))``.

PEM files are read when the client connects; a missing file or a certificate
without its key is :class:`~interlingua.client.InvalidArgument`. Covered by
``tests/test_security.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from ._exceptions import InvalidArgument

__all__ = ["TLS"]


@dataclass(frozen=True)
class TLS:
    """TLS for a client's channel, from PEM files.

    ``ca`` verifies the server's certificate (None: the system's roots); ``cert`` and ``key``
    together present a client certificate (servers with ``client_ca`` require one);
    ``server_name`` overrides the name checked against the server's certificate.
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("TLS: give both cert and key for a client certificate, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise InvalidArgument(f"TLS: cannot read {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))
