"""A collection's creation parameters as one value, from the CreateCollection request to the store.

The servicer builds a :class:`CollectionSpec` from the request, the engine checks it once
(:meth:`CollectionSpec.checked`: the name, home space and basis transform against its registries
first, then the prefix, index spec and training threshold here), the store writes it as the
collection's row and gives it back with every :class:`~.store.CollectionRow`, and the collection
builds its index from it (:meth:`CollectionSpec.parse_index`). Its fields are the columns of the
``collections`` table, by name. Covered by ``tests/test_index_options.py`` (ef_construction),
``tests/test_funnel.py`` (prefix_dims, basis_transform) and ``tests/test_index_safety.py`` (index
specs, train_min_points).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidArgument
from .index_spec import IndexSpec

if TYPE_CHECKING:
    from .config import Limits
    from .store import SpaceRow

__all__ = ["SPEC_COLUMNS", "CollectionSpec"]


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

    def index_dims(self, home: SpaceRow) -> int:
        """Dimensions the index holds: the prefix, or all of the home space's."""
        return self.prefix_dims or home.dim

    def parse_index(self, home: SpaceRow, limits: Limits | None = None) -> IndexSpec:
        """The checked :class:`~.index_spec.IndexSpec`; ``limits`` caps new collections (None: no cap,
        as at recovery). Raises InvalidArgument naming the spec and what is wrong."""
        return IndexSpec.parse(
            self.index_spec,
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
        index = self.parse_index(home, limits)
        train_min = index.check_train_min(self.train_min_points)
        return dataclasses.replace(self, index_spec=index.spec, train_min_points=train_min)


#: the ``collections`` columns that hold a spec, in field order
SPEC_COLUMNS = tuple(f.name for f in dataclasses.fields(CollectionSpec))
