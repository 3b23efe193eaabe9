"""The Interlingua service: domain core (:mod:`.engine`), storage (:mod:`.store`), FAISS
segments (:mod:`.segments`), thin gRPC servicers and server assembly (:mod:`.app`)."""

from .app import Server, create_server, serve
from .config import Limits, ServerConfig
from .engine import Engine, Lifecycle

__all__ = ["Engine", "Lifecycle", "Limits", "Server", "ServerConfig", "create_server", "serve"]
