"""Shared pytest set-up."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The book build executes every notebook (the bulk of the suite's time). Alone, run it last,
    # so a broken unit test is reported within minutes. Under xdist (make test: -n 2 --dist
    # loadscope) run it first: its worker builds the book while the other runs everything else.
    # (xdist workers collect too, and they see PYTEST_XDIST_WORKER rather than -n)
    parallel = bool(
        os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", None)
    )
    items.sort(key=lambda item: (item.path.name == "test_book.py") != parallel)
