"""Training: loss decreases, sharding rules (golden file), one compilation, cached == uncached,
SIGKILL + resume == uninterrupted, corrupt checkpoints, two processes on localhost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from addinov3_jax import config as config_lib
from addinov3_jax import dinov3, sharding, train
from addinov3_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "shardings_tiny_fsdp.json"
CLASSES = ("marble", "washer")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data") / "synthetic"
    synthetic.generate(root, categories=CLASSES, size=64, normal=3, per_defect=2)
    return root


def tiny_config(root, **train_overrides):
    c = config_lib.demo_config()
    c.data.root = str(root)
    c.data.classes = CLASSES
    c.data.image_size = 64
    c.train.epochs = 3
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


def final_params(workdir):
    return load_file(str(Path(workdir) / "model" / "adapters" / "params.safetensors"))


def test_eight_devices():
    assert jax.device_count() == 8


def test_loss_decreases_and_one_compilation(data, tmp_path):
    cfg = tiny_config(data, epochs=12, lr=3e-3, warmup_fraction=0.25)
    summary = train.train(cfg, tmp_path)
    assert summary["compilations"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"] == 12 * (18 // 8)
    first, last = np.mean([r["loss"] for r in rows[:4]]), np.mean([r["loss"] for r in rows[-4:]])
    assert last < 0.85 * first, (first, last)
    assert rows[0]["lr"] == 0.0 and rows[-1]["lr"] == pytest.approx(3e-3)  # warm-up from 0
    assert {"awareness", "segmentation", "global", "images_per_s"} <= set(rows[0])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "model" / "model.json").is_file()


def shardings_table():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    model = nnx.eval_shape(lambda: dinov3.create("tiny", rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    specs = sharding.state_shardings(state, mesh, sharding.FSDP_RULES)
    return {".".join(map(str, p)): str(v.get_value().spec) for p, v in nnx.to_flat_state(specs)}


def test_parameter_shardings_match_golden():
    table = shardings_table()
    if os.environ.get("ADDINOV3_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(GOLDEN.read_text())


def test_cached_equals_uncached(data, tmp_path):
    results = {}
    for mode in ("off", "device", "disk"):
        train.train(tiny_config(data, feature_cache=mode), tmp_path / mode)
        results[mode] = final_params(tmp_path / mode)
    for mode in ("device", "disk"):
        for k, v in results["off"].items():
            np.testing.assert_array_equal(results[mode][k], v, err_msg=f"{mode}: {k}")
    assert (tmp_path / "disk" / "feature_cache" / "patches.npy").is_file()


def _train_cmd(data, workdir, epochs=4):
    return [sys.executable, "-m", "addinov3_jax.cli", "train", "--config",
            str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            f"--config.data.root={data}", f"--config.data.classes={CLASSES!r}",
            "--config.data.image_size=64", f"--config.train.epochs={epochs}",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def test_kill_and_resume_equals_uninterrupted(data, tmp_path):
    env = dict(os.environ)
    full = subprocess.run(_train_cmd(data, tmp_path / "full", 12), env=env, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "killed", 12), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before the kill"
    resumed = subprocess.run(_train_cmd(data, tmp_path / "killed", 12), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "killed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise


def test_corrupt_checkpoint_falls_back(data, tmp_path, capsys):
    cfg = tiny_config(data, checkpoint_every=2, keep_checkpoints=5)
    train.train(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    newest = tmp_path / "checkpoints" / str(steps[-1])
    for f in (newest / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    cfg.train.epochs = 4  # continue past the corrupt checkpoint
    summary = train.train(cfg, tmp_path)
    assert summary["resumed_from"] == steps[-2]
    assert "unreadable" in capsys.readouterr().err


def test_two_processes_on_localhost(data, tmp_path):
    port = 20000 + os.getpid() % 20000
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", ADDINOV3_COORDINATOR=f"127.0.0.1:{port}",
                   ADDINOV3_NUM_PROCESSES="2", ADDINOV3_PROCESS_ID=str(pid))
        cmd = _train_cmd(data, tmp_path, epochs=2) + ["--config.multihost=True",
                                                     "--config.train.feature_cache=off"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == 4 and (tmp_path / "model" / "model.json").is_file()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # written by process 0 only


def test_training_from_arrayrecord_equals_raw(data, tmp_path):
    from addinov3_jax.data import tfds_builders

    tfds_builders.build("synthetic", data, tmp_path / "tfds")
    raw = tiny_config(data, epochs=2)
    raw.data.classes = ()  # the built dataset holds every class of the folder
    stored = tiny_config(data, epochs=2)
    stored.data.classes = ()
    stored.data.source = "tfds"
    stored.data.tfds_data_dir = str(tmp_path / "tfds")
    train.train(raw, tmp_path / "raw")
    train.train(stored, tmp_path / "stored")
    a, b = final_params(tmp_path / "raw"), final_params(tmp_path / "stored")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
