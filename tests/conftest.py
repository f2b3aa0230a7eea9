from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def face_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated-faces cache for the whole session (the tiny recipe's dataset is written once)."""
    return tmp_path_factory.mktemp("faces-cache")
