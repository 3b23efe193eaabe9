"""A collection's creation parameters as one value, from the CreateCollection request to the store.

The servicer builds a :class:`CollectionSpec` from the request, the engine checks it once
(:meth:`CollectionSpec.checked`: the name, home space and basis transform against its registries
first, then the prefix, index spec and training threshold here), the store writes it as the
collection's row and gives it back with every :class:`~.store.CollectionRow`, and the collection
builds its index from it (:meth:`CollectionSpec.parse_index`). Its fields are the columns of the
``collections`` table, by name. Covered by ``tests/test_index_options.py`` (ef_construction),
``tests/test_funnel.py`` (prefix_dims, basis_transform), ``tests/test_index_safety.py`` (index
specs, train_min_points) and ``tests/test_advisor.py`` (``auto``, target_recall).

``index_spec="auto"`` with a ``target_recall`` keeps ``auto`` in the store while the collection is
exact (Flat) and waits for the index advisor (``advisor_auto.py``); once it chose, the store holds the
chosen spec and, in ``operating_point``, the chosen point as JSON (its search parameters are the
collection's search defaults), and ``target_recall`` stays.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidArgument
from .index_spec import IndexSpec, SearchDefaults

if TYPE_CHECKING:
    from .config import Limits
    from .store import SpaceRow

__all__ = ["AUTO", "SPEC_COLUMNS", "CollectionSpec"]

AUTO = "auto"  #: the index spec that lets the index advisor choose


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is created with; as stored, ``index_spec`` is normalized and
    ``train_min_points`` resolved (:meth:`checked`)."""

    name: str
    home_space: str
    index_spec: str = "Flat"  #: a FAISS factory string of ``index_spec.py``'s grammar ("": Flat)
    train_min_points: int = 0  #: live points before an index that needs training trains (0: its default)
    prefix_dims: int = 0  #: Matryoshka prefix the index holds (0: every dimension)
    basis_transform: str = ""  #: "" or a home -> home transform applied before indexing (pca_basis, mrl_adapter)
    ef_construction: int = 0  #: HNSW efConstruction (0: FAISS's default, 40)
    target_recall: float = 0.0  #: ``auto`` collections: the Recall@10 the advisor's choice must reach (0: none)
    operating_point: str = ""  #: ``auto`` collections: the advisor's chosen point, JSON ("": not chosen yet)
    #: where the points and the ANN search live: "embedded" (SQLite + FAISS) or "milvus"
    #: (``server/backends``); "" in a request is the server's default, resolved before it is stored
    backend: str = ""
    backend_uri: str = ""  #: ``milvus``: the engine's address or Milvus Lite file, as resolved

    @property
    def on_milvus(self) -> bool:
        """True when a Milvus engine holds the collection's points (``server/backends/milvus.py``)."""
        return self.backend == "milvus"

    @property
    def auto(self) -> bool:
        """True while an ``auto`` collection waits for the advisor (its index is Flat meanwhile)."""
        return self.index_spec.strip().lower() == AUTO

    def point(self) -> dict[str, object]:
        """The chosen operating point ({} when none)."""
        if not self.operating_point:
            return {}
        try:
            value = json.loads(self.operating_point)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def search_defaults(self) -> SearchDefaults:
        """Search parameters of the chosen operating point (unset: the service's defaults)."""
        p = self.point()

        def get(key: str) -> int | None:
            v = p.get(key)
            return int(v) if isinstance(v, int | float) and v > 0 else None

        return SearchDefaults(get("ef_search"), get("nprobe"), get("k_factor"))

    def index_dims(self, home: SpaceRow) -> int:
        """Dimensions the index holds: the prefix, or all of the home space's."""
        return self.prefix_dims or home.dim

    def parse_index(self, home: SpaceRow, limits: Limits | None = None) -> IndexSpec:
        """The checked :class:`~.index_spec.IndexSpec`; ``limits`` caps new collections (None: no cap,
        as at recovery). Raises InvalidArgument naming the spec and what is wrong."""
        return IndexSpec.parse(
            "Flat" if self.auto else self.index_spec,
            self.index_dims(home),
            home.metric,
            self.ef_construction,
            max_nlist=limits.max_nlist if limits else None,
            max_overhead_bytes=limits.max_index_overhead_bytes if limits else None,
        )

    def checked(self, home: SpaceRow, limits: Limits) -> CollectionSpec:
        """The spec of a new collection in ``home`` as the store keeps it: the prefix checked, the index
        spec parsed under ``limits`` (and normalized) and the training threshold resolved."""
        if self.prefix_dims and not 0 < self.prefix_dims < home.dim:
            raise InvalidArgument(
                f"prefix_dims is {self.prefix_dims}; it must be between 1 and dim-1 = {home.dim - 1}"
                " (0 indexes all dims)"
            )
        target = self.target_recall
        if math.isnan(target) or not 0 <= target <= 1:
            raise InvalidArgument(f"target_recall is {target}; it must be in (0, 1]")
        if self.auto:
            if target <= 0:
                raise InvalidArgument("index_spec 'auto' needs a target_recall in (0, 1], e.g. 0.95")
            if self.ef_construction:
                raise InvalidArgument(
                    "ef_construction cannot be set with index_spec 'auto': the advisor chooses the index"
                )
            return dataclasses.replace(self, index_spec=AUTO, train_min_points=0)
        if target and not self.operating_point:
            raise InvalidArgument(
                f"target_recall applies to index_spec 'auto'; index spec {self.index_spec!r} is fixed"
                " (RecommendIndex measures one)"
            )
        index = self.parse_index(home, limits)
        train_min = index.check_train_min(self.train_min_points)
        return dataclasses.replace(self, index_spec=index.spec, train_min_points=train_min)


#: the ``collections`` columns that hold a spec, in field order
SPEC_COLUMNS = tuple(f.name for f in dataclasses.fields(CollectionSpec))
