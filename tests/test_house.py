"""The layout's promises: imports point one way (core ← adapters ← plugins ← tools), and compare is host-agnostic:
a host registered from this module, trained by its own tiny loop, runs through ``equirelax compare`` end to end."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {"core": "equirelax.core", "adapters": "equirelax.adapters", "plugins": "equirelax.plugins",
                 "equirelax": "equirelax"}
HOST_PACKAGES = ("mace", "nequip", "sevenn")
TRAINER_MODULES = ("mace.cli", "mace.tools.train", "mace.tools.scripts_utils", "nequip.train", "nequip.scripts",
                   "lightning", "pytorch_lightning", "hydra", "sevenn.train", "sevenn.scripts")
TOOLS = ("equirelax.cli", "equirelax.compare", "equirelax.datasets", "equirelax.models")


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    parts = [PACKAGE_ROOTS[relative.parts[0]], *relative.parts[1:]]
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts).replace("/", ".")


def imports_of(source: str, module: str, is_package: bool = False) -> set:
    """Every module ``source`` imports, at any depth (lazy imports in functions included), made absolute."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(room: str, module: str, imported: set) -> list:
    host_plugins = [f"equirelax.plugins.{host}" for host in HOST_PACKAGES]
    if room == "core":
        banned = ("equirelax.adapters", "equirelax.plugins", *TOOLS, *HOST_PACKAGES, "torch_geometric", "ase")
    elif room == "adapters":
        banned = ("equirelax.plugins", *TOOLS, *TRAINER_MODULES)
    elif room == "plugins":
        own = [p for p in host_plugins if _within(module, [p])]
        banned = (*TOOLS, *[p for p in host_plugins if p not in own])
    elif module.startswith("equirelax.compare"):
        banned = ("equirelax.plugins", *HOST_PACKAGES)  # compare's engine and report reach hosts only by interface
    else:
        banned = ()
    return sorted(name for name in imported if _within(name, banned))


def _sources():
    for room in ("core", "adapters", "plugins", "equirelax"):
        for path in sorted((ROOT / room).rglob("*.py")):
            yield room, path


@pytest.mark.parametrize("room, path", list(_sources()), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path)
                         else v)
def test_imports_point_one_way(room, path):
    module = _module_name(path)
    imported = imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert violations(room, module, imported) == []


@pytest.mark.parametrize("room, module, source, banned", [
    ("core", "equirelax.core.layer", "def f():\n    from ..adapters.mace import MaceAdapter\n", "equirelax.adapters.mace"),
    ("core", "equirelax.core.handle", "import mace.modules\n", "mace.modules"),
    ("adapters", "equirelax.adapters.nequip", "from nequip.train import NequIPLightningModule\n", "nequip.train"),
    ("adapters", "equirelax.adapters.mace", "from ..plugins.mace import training\n", "equirelax.plugins.mace"),
    ("plugins", "equirelax.plugins.mace.host", "from equirelax.datasets.emt import write_emt_dataset\n",
     "equirelax.datasets.emt"),
    ("plugins", "equirelax.plugins.mace.training", "from ..nequip import config\n", "equirelax.plugins.nequip"),
    ("equirelax", "equirelax.compare.engine", "from ..plugins.mace.host import MaceHost\n",
     "equirelax.plugins.mace.host"),
])
def test_the_import_check_catches_a_wrong_arrow(room, module, source, banned):
    assert banned in violations(room, module, imports_of(source, module))


def test_compare_keeps_no_host_names():
    for path in (ROOT / "equirelax" / "compare").glob("*.py"):
        text = path.read_text(encoding="utf-8").lower()
        for host in HOST_PACKAGES:
            assert host not in text, f"{path.name} names {host}"


# ------------------------------------------------------------------ a third host, registered here
@pytest.fixture()
def toy_host(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import toy_host

    from equirelax.core import hosts

    monkeypatch.setitem(hosts._registered, "toy", toy_host.ToyHost)
    return toy_host


def _toy_compare(directory, train: int, test: int, epochs: int, *arguments) -> int:
    """``equirelax compare --host toy`` on generated field data in ``directory``; returns the exit status."""
    import yaml

    from equirelax.cli import main
    from equirelax.datasets.emt import write_emt_dataset

    write_emt_dataset(directory / "train.xyz", train, seed=1, field=[0.0, 0.0, 0.3])
    write_emt_dataset(directory / "test.xyz", test, seed=2, field=[0.0, 0.0, 0.3])
    (directory / "toy.yaml").write_text(yaml.safe_dump({"train_file": "train.xyz", "test_file": "test.xyz",
                                                        "epochs": epochs, "lr": 0.01, "seed": 0}))
    with pytest.raises(SystemExit) as status:
        main(["compare", "--host", "toy", "--config", "toy.yaml", *arguments, "--out", "out", "--quiet"])
    return status.value.code


@pytest.mark.one_env
def test_a_registered_host_runs_through_compare_end_to_end(toy_host, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _toy_compare(tmp_path, 20, 5, 2, "--controllers", "vanilla", "ace", "recm")
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["host"] == "toy" and results["epochs"] == 2 and results["test_configurations"] == 5
    runs = {run["name"]: run for run in results["runs"]}
    assert [run["status"] for run in runs.values()] == ["ok", "ok", "ok"], [r["error"] for r in runs.values()]

    # compare's numbers are the toy host's own evaluation of the saved model, recomputed here
    from ase.io import read

    frames = read(str(tmp_path / "test.xyz"), ":")
    vanilla = torch.load(tmp_path / "out" / "runs" / "vanilla" / "model.pt", weights_only=False)
    errors = [(toy_host.energy_and_forces(vanilla, a.get_positions())[1].detach().numpy() - a.arrays["REF_forces"])
              for a in frames]
    mae = 1000 * sum(abs(e).sum() for e in errors) / sum(e.size for e in errors)
    assert runs["vanilla"]["test"]["equivariant"]["force_mae_mev_per_a"] == pytest.approx(mae, rel=1e-9)
    assert runs["vanilla"]["test"]["equivariant"]["equivariance_error"]["forces"] < 1e-10
    assert runs["vanilla"]["curves"]["epoch"] == [1, 2] and runs["vanilla"]["gamma"] == {}

    for name in ("ace", "recm"):
        run = runs[name]
        assert set(run["gamma"]) == {"linear"} and run["model_epoch"] == 2
        assert run["test"]["equivariant"]["equivariance_error"]["forces"] < 1e-10  # the exported model
        assert [e for e, _ in run["curves"]["gamma"]["linear"]] == [1, 2]
        assert run["seconds_per_epoch"] > 0 and run["peak_memory_mb"] > 0
    assert runs["ace"]["gamma"]["linear"] == 0.0  # ACE closes at the budget's last step
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# equirelax compare: toy") and "| recm | ok |" in report


@pytest.mark.one_env
def test_compare_with_seeds_runs_each_seed_and_reports_mean_and_spread(toy_host, tmp_path, monkeypatch):
    import statistics

    from equirelax.cli import main

    monkeypatch.chdir(tmp_path)
    assert _toy_compare(tmp_path, 12, 4, 1, "--controllers", "vanilla", "ace", "--seeds", "3", "5") == 0
    per_seed = {s: json.loads((tmp_path / "out" / f"seed{s}" / "results.json").read_text()) for s in (3, 5)}
    assert [per_seed[s]["seed"] for s in (3, 5)] == [3, 5]
    values = [next(r for r in per_seed[s]["runs"] if r["name"] == "vanilla")["test"]["equivariant"]
              ["force_mae_mev_per_a"] for s in (3, 5)]
    assert values[0] != values[1]  # the seed reached the host's training
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    row = summary["runs"]["vanilla"]["equivariant/force_mae_mev_per_a"]
    assert summary["seeds"] == [3, 5] and row["values"] == values
    assert row["mean"] == pytest.approx(statistics.fmean(values))
    assert row["std"] == pytest.approx(statistics.stdev(values))
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# equirelax compare: toy, 2 seeds") and "lower on" in report
    with pytest.raises(SystemExit, match="--seed or --seeds"):
        main(["compare", "--host", "toy", "--config", "toy.yaml", "--seeds", "1", "2", "--seed", "4"])


def test_an_unknown_host_names_the_registered_ones(toy_host):
    from equirelax.core.hosts import HostConfigError, get_host

    with pytest.raises(HostConfigError, match=r"unknown host 'sevenm'; choose one of \[.*'toy'.*\]"):
        get_host("sevenm")
    with pytest.raises(TypeError, match="subclass of equirelax.core.hosts.Host"):
        from equirelax.core.hosts import register_host

        register_host("bad", object)
    assert sys.modules["toy_host"].ToyHost.name == "toy"
