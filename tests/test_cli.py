"""The `addinov3` console script: every subcommand has --help; unlanded ones fail loudly;
the package never imports torch at run time."""

import os
import shutil
import subprocess
import sys

import pytest

SUBCOMMANDS = ["convert", "train", "eval", "predict", "parity", "demo", "data"]


def addinov3(*args):
    exe = shutil.which("addinov3", path=os.path.dirname(sys.executable))
    assert exe, "the addinov3 console script is not installed next to this python"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(sub):
    res = addinov3(*([sub] if sub else []), "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: addinov3" in res.stdout


def test_package_never_imports_torch():
    code = ("import sys, addinov3_jax.cli, addinov3_jax.dinov3, addinov3_jax.checkpoint_io, "
            "addinov3_jax.sharding, addinov3_jax.weight_conversion.dinov3, addinov3_jax.demo\n"
            "import pkgutil, importlib, addinov3_jax\n"
            "for m in pkgutil.walk_packages(addinov3_jax.__path__, 'addinov3_jax.'):\n"
            "    if m.name != 'addinov3_jax.parity': importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_source_is_one_clear_line(tmp_path):
    res = addinov3("convert", "dinov3", "--source", str(tmp_path / "missing.pth"),
                   "--output", str(tmp_path / "out"))
    assert res.returncode == 1
    assert "no such file" in res.stderr and "Traceback" not in res.stderr


def test_core_dependencies_exclude_torch():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core and "transformers" not in core
    assert all("torch==2.13.0" in " ".join(v) for k, v in project["optional-dependencies"].items()
               if any("torch" in d for d in v))
