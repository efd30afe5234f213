"""Test-wide fixtures."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _annotation_cache_in_tmp(tmp_path_factory):
    """The VOC annotation cache goes to a temporary folder, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAPDET_CACHE_DIR", str(tmp_path_factory.mktemp("mapdet_cache")))
        yield
