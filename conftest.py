"""Shared by ``tests/`` and ``integration_tests/``."""

from importlib.metadata import PackageNotFoundError, version

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


def _e3nn_major_minor() -> tuple:
    try:
        return tuple(int(part) for part in version("e3nn").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0, 0)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.one_env``: long trainings whose outcome does not hang on the e3nn version (controller
    dynamics, compare's machinery on the toy host) run in the e3nn ≥ 0.6 environment only; every other core test
    runs under both e3nn versions."""
    if _e3nn_major_minor() >= (0, 6):
        return
    skip = pytest.mark.skip(reason="one_env: run in the e3nn >= 0.6 environment (make test-nequip)")
    for item in items:
        if "one_env" in item.keywords:
            item.add_marker(skip)
