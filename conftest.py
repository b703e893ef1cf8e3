"""Shared by ``tests/`` and ``integration_tests/``."""

import pytest

EQUIRELAX_NOT_INSTALLED = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):  # as if equirelax were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "equirelax":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
try:
    import equirelax
    raise SystemExit("equirelax is importable")
except ModuleNotFoundError:
    pass
"""


@pytest.fixture(scope="session")
def not_installed() -> str:
    """Python source that makes ``import equirelax`` fail: the start of a subprocess script that must run a
    deployed or exported model without equirelax."""
    return EQUIRELAX_NOT_INSTALLED
