"""Every test under ``tests/campaigns/`` is a long correctness campaign: marked ``campaign``
(``make test`` skips them, ``make campaigns`` runs them), whatever its module says."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.campaign)
