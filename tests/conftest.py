"""Test-wide fixtures, and a numba cache keyed by the compiled sources."""

import hashlib
import importlib.util
import os
import pathlib
import tempfile

import pytest


def _numba_cache_dir() -> str:
    """A numba cache folder named by a digest of every mapdet source file.

    Numba invalidates a cached kernel only when the kernel's own file changes, not when a
    function it calls from another file does: after an edit to ``core/overlap.py`` the cached
    ``core/gradkernel.py`` kernel would still run the old cascade, and the tests would test
    old code. Keying the cache by all the sources makes a stale kernel impossible in tests."""
    root = pathlib.Path(importlib.util.find_spec("mapdet").submodule_search_locations[0])
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"mapdet-numba-{digest.hexdigest()[:16]}")


# Before anything imports numba (conftest is imported before the test modules).
os.environ.setdefault("NUMBA_CACHE_DIR", _numba_cache_dir())


@pytest.fixture(autouse=True, scope="session")
def _annotation_cache_in_tmp(tmp_path_factory):
    """The VOC annotation cache goes to a temporary folder, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAPDET_CACHE_DIR", str(tmp_path_factory.mktemp("mapdet_cache")))
        yield
