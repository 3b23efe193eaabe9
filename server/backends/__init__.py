"""Storage and search backends of a collection, chosen at its creation (``CollectionSpec.backend``).

``embedded`` is :class:`~..collection.Collection` (SQLite + FAISS in the server process), the default;
``milvus`` is :class:`~.milvus.MilvusCollection`, whose points and ANN search live in a Milvus engine
(``milvus_schema.py``: names, fields, index mapping; ``milvus_engines.py``: clients, errors, health).
``move.py`` moves a running embedded collection to an engine (``MoveCollection``).
pymilvus is imported on first use only: a server without the ``milvus`` extra starts and serves
embedded collections. See docs/ARCHITECTURE.md, "Backends".
"""
