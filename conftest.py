"""The docstring examples (``--doctest-modules`` over monitor/ and tests/) run from the project's
root, so the paths they name (``examples/policies/...``) resolve wherever pytest was started."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _examples_run_from_the_root(request: pytest.FixtureRequest) -> None:
    if isinstance(request.node, DoctestItem):
        request.getfixturevalue("monkeypatch").chdir(ROOT)
