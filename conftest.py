"""Shared by ``tests/`` and ``integration_tests/``."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
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
    dynamics, compare's machinery on the toy host) run in the e3nn 0.4 environment only, whose suite is the
    shorter of the two that ``make test`` runs side by side; every other core test runs under both versions."""
    if _e3nn_major_minor() < (0, 6):
        return
    skip = pytest.mark.skip(reason="one_env: run in the e3nn 0.4 environment (make test-mace)")
    for item in items:
        if "one_env" in item.keywords:
            item.add_marker(skip)


def _probe_sides(handle, forward, structure_of_row):
    """RECM's split of one probing forward (``forward()`` calls the relaxed model on a batch): per relaxed
    layer, the side of each structure its rows were given (``structure_of_row``: the structure index of each
    row, or a tuple of such for layers of different rows, nodes and edges), asserting that the sides came
    from the batch's samples (not the position fallback) and that every row of a structure is on one side."""
    from equirelax.core.layer import RelaxedLayer

    seen = {}
    original = RelaxedLayer._second_map_rows

    def spy(layer, x):
        from_samples = any(sides.shape[0] == x.shape[0] for sides in layer.__dict__.get("sample_sides") or ())
        rows = original(layer, x)
        seen[layer] = (from_samples, rows)
        return rows

    RelaxedLayer._second_map_rows = spy
    try:
        for layer in handle.layers.values():
            layer.probing = True
        forward()
    finally:
        RelaxedLayer._second_map_rows = original
        for layer in handle.layers.values():
            layer.probing, layer.probe_sums, layer.probe_leaves = False, None, None
    sides = {}
    candidates = structure_of_row if isinstance(structure_of_row, tuple) else (structure_of_row,)
    for name, layer in handle.layers.items():
        from_samples, rows = seen[layer]
        structures = next((ids for ids in candidates if ids.shape == rows.shape), None)
        assert from_samples and structures is not None, name
        per_structure = {}
        for structure, side in zip(structures.tolist(), rows.tolist()):
            assert per_structure.setdefault(structure, side) == side, (name, structure)
        sides[name] = per_structure
    return sides


@pytest.fixture(scope="session")
def probe_sides():
    """``probe_sides(handle, forward, structure_of_row)``: see ``_probe_sides``."""
    return _probe_sides


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _torchrun_once(argv, cwd, env, hang_after):
    """``(returncode, stdout, stderr, hung)``. A run still going after ``hang_after`` s (a normal one takes
    10-40 s) has its processes' Python stacks printed (faulthandler, on SIGABRT) and is killed."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        try:
            process.wait(timeout=hang_after)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            ranks = _descendants(process.pid)
            for pid in [*ranks, process.pid]:
                _signal(pid, signal.SIGABRT)
            time.sleep(5)
            for pid in [*ranks, process.pid]:
                _signal(pid, signal.SIGKILL)
            process.wait()
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), hung


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _torchrun(argv, cwd=None, env=None, hang_after=300):
    """``torchrun --standalone --nproc_per_node 2 ARGV``, asserting it exits 0; returns its stdout. A run
    that hangs is run once more, with the first try's stacks given as a warning: two hangs fail the test
    with the stacks of the second."""
    code, out, err, hung = _torchrun_once(argv, cwd, env, hang_after)
    if hung:
        warnings.warn(f"torchrun {' '.join(map(str, argv))} hung for {hang_after} s and was run again; its "
                      f"stacks:\n{err[-8000:]}")
        code, out, err, hung = _torchrun_once(argv, cwd, env, hang_after)
    assert not hung, f"hung twice for {hang_after} s; the stacks:\n{err[-10000:]}"
    assert code == 0, out[-3000:] + err[-5000:]
    return out


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(argv, cwd=None, env=None)``: see ``_torchrun``."""
    return _torchrun
