"""The `addinov3` console script: every subcommand has --help; unlanded ones fail loudly;
the package never imports torch at run time."""

import os
import shutil
import subprocess
import sys

import pytest

SUBCOMMANDS = ["convert", "train", "eval", "predict", "calibrate", "parity", "demo", "data"]


def addinov3(*args):
    exe = shutil.which("addinov3", path=os.path.dirname(sys.executable))
    assert exe, "the addinov3 console script is not installed next to this python"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_console_script_runs():
    res = addinov3("--help")
    assert res.returncode == 0, res.stderr
    assert "usage: addinov3" in res.stdout


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(sub, capsys):
    from addinov3_jax.commands.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*([sub] if sub else []), "--help"])
    assert exit_.value.code == 0
    assert "usage: addinov3" in capsys.readouterr().out


def test_package_never_imports_torch(tmp_path):
    code = ("import pathlib, sys\n"
            "import addinov3_jax.commands.cli, addinov3_jax.models.dinov3, weight_conversion.dinov3\n"
            "import pkgutil, importlib, addinov3_jax\n"
            "for m in pkgutil.walk_packages(addinov3_jax.__path__, 'addinov3_jax.'):\n"
            "    if m.name != 'addinov3_jax.commands.parity': importlib.import_module(m.name)\n"
            "from addinov3_jax.runtime import trainer\n"  # TensorBoard events (tensorboardX)
            "w = trainer._Writers(pathlib.Path(sys.argv[1]), True, 0)\n"
            "w.write({'step': 1, 'loss': 0.5}); w.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_source_is_one_clear_line(tmp_path):
    res = addinov3("convert", "dinov3", "--source", str(tmp_path / "missing.pth"),
                   "--output", str(tmp_path / "out"))
    assert res.returncode == 2
    assert res.stderr.startswith("addinov3 convert: error: ") and "no such file" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0


def _garbage(tmp_path, name="bad.pth"):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    return str(path)


def _nonempty(tmp_path):
    (tmp_path / "full").mkdir(exist_ok=True)
    (tmp_path / "full" / "keep.txt").write_text("x")
    return str(tmp_path / "full")


def _a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile")


# (command line built from tmp_path, expected fragment of the one-line error)
BAD_INPUTS = {
    "garbage .pth (dinov3)": (lambda t: ["convert", "dinov3", "--source", _garbage(t), "--output",
                                         str(t / "o")],
                              "not a readable PyTorch checkpoint (unpickling failed"),
    "garbage .pth (adapters)": (lambda t: ["convert", "adapters", "--source", _garbage(t), "--output",
                                           str(t / "o")], "not a readable PyTorch checkpoint"),
    "unknown suffix": (lambda t: ["convert", "clip-text", "--source", _garbage(t, "w.npz"), "--output",
                                  str(t / "o")], "unknown checkpoint type"),
    "output is a file": (lambda t: ["convert", "dinov3", "--source", _garbage(t), "--output",
                                    _a_file(t)], "afile: exists and is a file"),
    "output not empty": (lambda t: ["convert", "dinov3", "--source", _garbage(t), "--output",
                                    _nonempty(t)], "full: exists and is not empty; choose another "
                                                   "output or pass --overwrite"),
    "convert without --source": (lambda t: ["convert", "dinov3", "--output", str(t / "o")],
                                 "convert dinov3 needs --source"),
    "convert model, parts missing": (lambda t: ["convert", "model", "--dinov3", "x", "--output",
                                                str(t / "o")], "missing --clip-text --adapters"),
    "hf:// malformed": (lambda t: ["convert", "dinov3", "--source", "hf://just-a-name", "--output",
                                   str(t / "o")], "expected hf://ORG/REPO"),
    "data build, no manual dir": (lambda t: ["data", "build", "mvtec", "--manual-dir", str(t / "nope"),
                                             "--data-dir", str(t / "tfds")],
                                  "nope: the manual dir (the raw mvtec dataset root) does not exist"),
    "data inspect, no root": (lambda t: ["data", "inspect", "mvtec", "--root", str(t / "nope")],
                              "dataset root not found"),
    "predict, no model": (lambda t: ["predict", "--checkpoint", str(t), "--class-name", "x",
                                     "--output", str(t / "o"), str(t)], "neither a model directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_user_errors_are_one_line(case, tmp_path, capsys):
    from addinov3_jax.commands.cli import main

    build, fragment = BAD_INPUTS[case]
    argv = build(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"addinov3 {argv[0]}: error: ") and fragment in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "weights_only" not in err  # no torch boilerplate
    assert not (tmp_path / "tfds").exists()  # a failed build leaves no dataset folder behind
    assert not list(tmp_path.glob(".o.*"))  # no temporary output left behind


def test_debug_shows_the_traceback(tmp_path):
    from addinov3_jax.commands.cli import main
    from addinov3_jax.io.checkpoint_io import CheckpointError

    with pytest.raises(CheckpointError, match="not a readable PyTorch"):
        main(["--debug", "convert", "dinov3", "--source", _garbage(tmp_path), "--output",
              str(tmp_path / "o")])


def test_parity_unknown_variant_is_one_line(capsys):
    pytest.importorskip("transformers")
    from addinov3_jax.commands.cli import main

    assert main(["parity", "dinov3", "--random", "vitfoo"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown DINOv3 variant 'vitfoo'; known: vits16" in err and err.count("\n") == 1


def test_core_dependencies_exclude_torch():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core and "transformers" not in core
    assert all("torch==2.13.0" in " ".join(v) for k, v in project["optional-dependencies"].items()
               if any("torch" in d for d in v))
