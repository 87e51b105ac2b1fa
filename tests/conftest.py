"""Shared pytest set-up."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The book build executes every notebook (the bulk of the suite's time): run it last, so a
    # broken unit test is reported within minutes, not after the whole book has been built.
    items.sort(key=lambda item: item.path.name == "test_book.py")
