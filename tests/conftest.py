"""Test-wide fixtures."""

import pytest


@pytest.fixture(autouse=True)
def _annotation_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The VOC annotation cache goes to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("MAPDET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mapdet_cache"))
