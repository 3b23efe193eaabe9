"""Model migrations: a collection's gallery moving from an old embedding space to a new one.

:mod:`.calibration` maps old-index scores onto the new index's scale and merges the two top-k lists
of a mixed (partly backfilled) gallery; :mod:`.order` suggests which points to re-embed first.
Measured by ``bench/backfill.py`` (docs/MIGRATION.md).
"""
