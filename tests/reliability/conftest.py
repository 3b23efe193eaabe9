"""Reliability tests run only when asked: ``--reliability`` or ``INTERLINGUA_RELIABILITY=1``.

``make test`` collects them and skips them at once (each is marked ``reliability`` and
``slow``); ``make reliability`` runs ``python -m tests.reliability``, which sets the variable.
The ``server`` fixture gives a factory of :class:`ServerProcess` whose processes are
all killed at teardown, whatever the test did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._harness import ServerProcess

ENABLE_ENV = "INTERLINGUA_RELIABILITY"
HERE = Path(__file__).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability", action="store_true", default=False, help="run tests/reliability (slow)")


def _enabled(config: pytest.Config) -> bool:
    flag = bool(config.getoption("--reliability", default=False))
    return flag or os.environ.get(ENABLE_ENV, "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in mine:
        item.add_marker(pytest.mark.reliability)
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason=f"reliability suite: run `make reliability` (or --reliability / {ENABLE_ENV}=1)")
    for item in mine:
        item.add_marker(skip)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``server(name, config=..., api_key=...)`` -> a ServerProcess on ``tmp_path/name`` (not started)."""
    made: list[ServerProcess] = []

    def factory(name: str = "data", **kw: Any) -> ServerProcess:
        p = ServerProcess(tmp_path / name, tmp_path / f"{name}.log", **kw)
        made.append(p)
        return p

    yield factory
    for p in made:
        p.stop(grace=5)
