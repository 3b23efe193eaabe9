"""Interlingua: backward-compatible embedding retrieval over gRPC.

Subpackages:

* ``interlingua.v1``     -- generated protobuf and gRPC code (``make proto``).
* ``interlingua.server`` -- the service: domain core, storage, FAISS indexes, servicers.
* ``interlingua.client`` -- the Python client (numpy in, numpy out) and the ``interlingua`` CLI.
"""

__version__ = "0.1.0"
