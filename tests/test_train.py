"""Training: loss decreases, sharding rules (golden file), one compilation, cached == uncached,
SIGKILL + resume == uninterrupted, corrupt checkpoints, two processes == one process (and a
two-process checkpoint resumed on one process), FSDP / tensor
parallel meshes equal to data parallelism, the workdir lock, finished and interrupted runs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from addinov3_jax import config as config_lib
from addinov3_jax.models import dinov3, sharding
from addinov3_jax.runtime import distributed, steps, test_hooks
from addinov3_jax.runtime import trainer as train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "shardings_tiny_fsdp.json"
CLASSES = ("marble", "washer")


@pytest.fixture(scope="module")
def data(train_data):
    """conftest's `train_data` (the classes `CLASSES`)."""
    return train_data


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
    mesh = distributed.make_mesh(data=2, fsdp=4)
    model = nnx.eval_shape(lambda: dinov3.create("tiny", rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    specs = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
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


def _train_args(data, workdir, epochs=4):
    """`addinov3 train` on the module's data: the same command in-process (`cli.main`) or as a
    subprocess (`_train_cmd`), where a process boundary is the point (a kill, a Ctrl-C)."""
    return ["train", "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            f"--config.data.root={data}", f"--config.data.classes={CLASSES!r}",
            "--config.data.image_size=64", f"--config.train.epochs={epochs}",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def _train_cmd(data, workdir, epochs=4):
    return [sys.executable, "-m", "addinov3_jax.commands.cli", *_train_args(data, workdir, epochs)]


def test_kill_and_resume_equals_uninterrupted(data, tmp_path, capsys):
    """SIGKILL right after step 5 (deterministic: a test hook in the loop, checkpoints at 2 and 4
    are on disk), then the same command resumes; the result is bitwise the uninterrupted one.
    Only the killed run needs its own process; the others run the same command in-process."""
    from addinov3_jax.commands.cli import main

    assert main(_train_args(data, tmp_path / "full", 6)) == 0
    killed = subprocess.run(_train_cmd(data, tmp_path / "killed", 6), capture_output=True, text=True,
                            env=dict(os.environ, **{test_hooks.SIGNAL_AFTER_STEP_ENV: "5:SIGKILL"}),
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model").exists()
    capsys.readouterr()
    assert main(_train_args(data, tmp_path / "killed", 6)) == 0
    assert "resuming from step 4 of 12" in capsys.readouterr().out
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "killed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows]
    assert steps == list(range(1, 13)), steps  # rows 5 (after the kept checkpoint) not repeated
    assert main(_train_args(data, tmp_path / "killed", 6)) == 0
    assert "already finished" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_resumable(data, tmp_path, capsys):
    """Ctrl-C (SIGINT right after step 3): a checkpoint at step 3, one line, exit 130; the same
    command then resumes from step 3 and finishes."""
    from addinov3_jax.commands.cli import main

    res = subprocess.run(_train_cmd(data, tmp_path, 3), capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, **{test_hooks.SIGNAL_AFTER_STEP_ENV: "3:SIGINT"}))
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "interrupted at step 3 of 6; rerun the same command to resume" in res.stderr
    assert (tmp_path / "checkpoints" / "3").is_dir() and not (tmp_path / "model").exists()
    assert main(_train_args(data, tmp_path, 3)) == 0
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.json").is_file()


def test_stop_after_then_resume_equals_uninterrupted(data, tmp_path):
    full = train.train(tiny_config(data, epochs=3), tmp_path / "full")
    part = train.train(tiny_config(data, epochs=3, stop_after=3), tmp_path / "part")
    assert part["steps"] == 3 and not (tmp_path / "part" / "model").exists()
    rest = train.train(tiny_config(data, epochs=3), tmp_path / "part")
    assert rest["resumed_from"] == 3 and rest["steps"] == full["steps"]
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "part")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_checkpoint_falls_back(data, tmp_path, capsys):
    cfg = tiny_config(data, checkpoint_every=2, keep_checkpoints=5)
    train.train(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    newest = tmp_path / "checkpoints" / str(steps[-1])
    for f in (newest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    cfg.train.epochs = 4  # continue past the corrupt checkpoint
    import shutil

    shutil.rmtree(tmp_path / "model")
    summary = train.train(cfg, tmp_path)
    assert summary["resumed_from"] == steps[-2]
    assert "unreadable" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The adapters of a 4-step run (2 epochs) on one process with 8 devices, no feature cache."""
    workdir = tmp_path_factory.mktemp("one_process")
    train.train(tiny_config(data, epochs=2, feature_cache="off"), workdir)
    return final_params(workdir)


def _two_processes(data, workdir, *flags):
    """`addinov3 train` as two localhost processes with 4 CPU devices each (one 8-device mesh)."""
    import socket

    with socket.socket() as s:  # a free coordinator port for each run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                   ADDINOV3_COORDINATOR=f"127.0.0.1:{port}", ADDINOV3_NUM_PROCESSES="2",
                   ADDINOV3_PROCESS_ID=str(pid))
        cmd = _train_cmd(data, workdir, epochs=2) + ["--config.multihost=True", *flags]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _assert_same_model(got, ref, what):
    """Within 1e-6 (|w| ~ 0.3; the cross-process all-reduce adds the gradients in another order,
    which AdamW turns into ~1e-7 differences)."""
    for k, v in ref.items():
        scale = float(np.max(np.abs(v)))
        dw = float(np.max(np.abs(got[k] - v)))
        print(f"{what}: {k}: max|dw| = {dw:.3g} (max|w| = {scale:.3g})")
        assert dw <= 1e-6, (what, k, dw, scale)


def test_two_processes_equal_one_process_cached_or_not(data, tmp_path, one_process):
    """One 8-device mesh, two ways: 2 processes x 4 devices train the same model as 1 process x 8
    devices (one global order of examples; each process reads its rows of each global batch).
    Then 2 processes with a disk feature cache stop after step 3 (mid-epoch): their losses are
    bitwise those of the uncached run, and one process with a device cache resumes the checkpoint
    and ends at the uninterrupted one-process model."""
    live, cached = tmp_path / "live", tmp_path / "cached"
    _two_processes(data, live, "--config.train.feature_cache=off")
    steps = [int(p.name) for p in (live / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == 4 and (live / "model" / "model.json").is_file()
    rows = (live / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # written by process 0 only
    _assert_same_model(final_params(live), one_process, "2x4 vs 1x8")

    _two_processes(data, cached, "--config.train.feature_cache=disk", "--config.train.stop_after=3")
    assert (cached / "checkpoints" / "3").is_dir() and not (cached / "model").exists()
    for pid in range(2):
        assert (cached / "feature_cache" / f"process-{pid}-of-2" / "patches.npy").is_file()
    losses = [[json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (live, cached)]
    assert losses[1] == losses[0][:3]  # cached == uncached, bitwise
    rest = train.train(tiny_config(data, epochs=2, feature_cache="device"), cached)
    assert rest["resumed_from"] == 3 and rest["steps"] == 4
    _assert_same_model(final_params(cached), one_process, "2x4 cached, resumed 1x8 vs 1x8")


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


def _mesh_params(data, workdir, data_axis, fsdp=1, tensor=1):
    cfg = tiny_config(data, epochs=2, checkpoint_every=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data_axis, fsdp, tensor
    train.train(cfg, workdir)
    return final_params(workdir)


def test_fsdp_and_tensor_parallel_equal_data_parallel(data, tmp_path):
    """Same data, same steps: sharding the weights (fsdp, tensor) changes no result beyond 1e-6."""
    ref = _mesh_params(data, tmp_path / "data8", 8)
    for name, mesh in (("fsdp4_tensor2", (1, 4, 2)), ("fsdp8", (1, 8))):
        got = _mesh_params(data, tmp_path / name, *mesh)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, atol=1e-6, rtol=0, err_msg=f"{name}: {k}")


def test_sharded_state_has_no_full_copies(data, tmp_path):
    """With fsdp=8 every large backbone and adapter array lives in 8 shards and no device holds a
    whole copy of any of them (live-buffer accounting on the simulated devices)."""
    import gc

    from addinov3_jax.runtime import setup

    cfg = tiny_config(data)
    mesh = distributed.make_mesh(1, 8, 1)
    rules = sharding.DEFAULT_RULES
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    backbone = setup.backbone(cfg.model, mesh, rules, 0)
    state, _ = steps.init_train_state(setup.adapters_fn(64, 32, 4, 0), optax_adamw(), mesh, rules)
    gc.collect()
    new = [a for a in jax.live_arrays() if id(a) not in before]
    sharded = {}
    for path, var in nnx.to_flat_state(nnx.state(backbone)):
        arr = var.get_value()
        if arr.ndim and "embed" in (var.get_metadata().get("out_sharding") or ()):
            sharded[path] = arr
    sharded["adapters.patch"] = state.params["patch"]
    whole = [a.shape for a in new if len(a.sharding.device_set) == 1 and a.size > 1024]
    assert not whole, whole  # no unsharded copy was made while building
    for path, arr in sharded.items():
        assert {s.data.size for s in arr.addressable_shards} == {arr.size // 8}, path


def optax_adamw():
    import optax

    return optax.adamw(1e-3)


def test_lock_finished_and_unwritable(data, tmp_path):
    import socket

    work = tmp_path / "w"
    work.mkdir()
    (work / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
        train.train(tiny_config(data), work)
    (work / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    train.train(tiny_config(data, epochs=1), work)  # a stale lock is taken over
    assert not (work / ".lock").exists()
    blocker = tmp_path / "a_file"  # a workdir below a file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        train.train(tiny_config(data), blocker / "run")


def test_missing_synthetic_root_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "typo")
    with pytest.raises(Exception, match="no such dataset folder"):
        train.train(cfg, tmp_path / "run")
    assert not (tmp_path / "typo").exists()


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill in the middle of a metrics.jsonl write leaves a torn last line: resume drops it."""
    rows = [json.dumps({"step": i, "loss": 1.0}) for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    writer = train._Writers(tmp_path, True, resume_step=2)
    writer.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoints_of_another_run_are_refused(data, tmp_path):
    train.train(tiny_config(data, epochs=1, stop_after=1), tmp_path)
    other = tiny_config(data, epochs=1)
    other.model.feature_layers = (0, 1, 2, 2 + 1)[::-1]
    with pytest.raises(ValueError, match="model.feature_layers"):
        train.train(other, tmp_path)
