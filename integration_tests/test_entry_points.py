"""Every command says which environment or extra it needs, instead of a traceback (run in both environments)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MISSING = [host for host in ("mace", "nequip", "sevenn") if importlib.util.find_spec(host) is None]


def _run(*command, cwd):
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif("mace" not in MISSING, reason="MACE is installed here")
def test_mace_train_without_mace_names_the_extra(tmp_path):
    result = _run(BIN / "equirelax-mace-train", "--config", "config.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "this environment has no MACE: install it with pip install 'equirelax[mace]'" in result.stderr


@pytest.mark.skipif("sevenn" not in MISSING, reason="sevenn is installed here")
def test_sevenn_train_without_sevenn_names_the_extra(tmp_path):
    result = _run(BIN / "equirelax-sevenn", "input.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "this environment has no sevenn: install it with pip install 'equirelax[sevenn]'" in result.stderr


@pytest.mark.parametrize("host", [h for h in MISSING if h != "sevenn"])
def test_pretrain_for_a_host_that_is_not_installed_names_the_extra(tmp_path, host):
    result = _run(BIN / "equirelax", "pretrain", "--host", host, "--out", "pre", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"equirelax: pretrain --host {host} needs {host}: pip install 'equirelax[{host}]'" in result.stderr
    assert not (tmp_path / "pre").exists()


def test_export_for_a_host_whose_runs_export_themselves_says_so(tmp_path):
    (tmp_path / "x.model").write_text("")
    result = _run(BIN / "equirelax", "export", "--host", "mace", "x.model", "y.model", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "export has no mace support (mace runs write their exported model themselves)" in result.stderr \
        or "needs mace" in result.stderr
