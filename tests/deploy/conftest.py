"""What the deploy/ and docker-compose.yml tests share (no Docker needed)."""

from __future__ import annotations

import pytest
import yaml

from deploy.local.stack import COMPOSE_FILE


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as read by YAML (the file the stack runs: deploy.local.stack.COMPOSE_FILE)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())
