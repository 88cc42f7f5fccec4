"""Several processes: two localhost processes (4 CPU devices each, one 8-device mesh) train the
model one process trains (cached or not, and a two-process checkpoint resumed on one process),
and evaluate to the same results."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import runs

from addinov3_jax.runtime import trainer as train

EVAL_CLASSES = ("pill", "weave")  # conftest.EVAL_DATA


@pytest.fixture(scope="module")
def one_process(train_data, tiny_towers, tmp_path_factory):
    """The adapters of a 4-step run (2 epochs) on one process with 8 devices, no feature cache."""
    workdir = tmp_path_factory.mktemp("one_process")
    train.train(runs.tiny_config(train_data, tiny_towers, epochs=2, feature_cache="off"), workdir)
    return runs.final_params(workdir)


def _free_port() -> int:
    """A localhost TCP port nobody listens on now (the coordinator of a multi-process run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two_processes(args):
    """`addinov3 ARGS --config.multihost=True` as two localhost processes with 4 CPU devices each
    (one 8-device mesh, a new coordinator port for each run)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                   ADDINOV3_COORDINATOR=f"127.0.0.1:{port}", ADDINOV3_NUM_PROCESSES="2",
                   ADDINOV3_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "addinov3_jax.commands.cli", *args, "--config.multihost=True"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _train_on_two_processes(train_data, tiny_towers, workdir, *flags):
    """`addinov3 train` of 2 epochs on two processes."""
    _on_two_processes([*runs.train_args(train_data, tiny_towers, workdir, epochs=2), *flags])


def _assert_same_model(got, ref, what):
    """Within 1e-6 (|w| ~ 0.3; the cross-process all-reduce adds the gradients in another order,
    which AdamW turns into ~1e-7 differences)."""
    for k, v in ref.items():
        scale = float(np.max(np.abs(v)))
        dw = float(np.max(np.abs(got[k] - v)))
        print(f"{what}: {k}: max|dw| = {dw:.3g} (max|w| = {scale:.3g})")
        assert dw <= 1e-6, (what, k, dw, scale)


def test_two_processes_equal_one_process_cached_or_not(train_data, tiny_towers, tmp_path, one_process):
    """One 8-device mesh, two ways: 2 processes x 4 devices train the same model as 1 process x 8
    devices (one global order of examples; each process reads its rows of each global batch).
    Then 2 processes with a disk feature cache stop after step 3 (mid-epoch): their losses are
    bitwise those of the uncached run, and one process with a device cache resumes the checkpoint
    and ends at the uninterrupted one-process model."""
    live, cached = tmp_path / "live", tmp_path / "cached"
    _train_on_two_processes(train_data, tiny_towers, live, "--config.train.feature_cache=off")
    steps = [int(p.name) for p in (live / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == 4 and (live / "model" / "model.json").is_file()
    rows = (live / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # written by process 0 only
    _assert_same_model(runs.final_params(live), one_process, "2x4 vs 1x8")

    _train_on_two_processes(train_data, tiny_towers, cached, "--config.train.feature_cache=disk",
                            "--config.train.stop_after=3")
    assert (cached / "checkpoints" / "3").is_dir() and not (cached / "model").exists()
    for pid in range(2):
        assert (cached / "feature_cache" / f"process-{pid}-of-2" / "patches.npy").is_file()
    losses = [[json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (live, cached)]
    assert losses[1] == losses[0][:3]  # cached == uncached, bitwise
    rest = train.train(runs.tiny_config(train_data, tiny_towers, epochs=2, feature_cache="device"), cached)
    assert rest["resumed_from"] == 3 and rest["steps"] == 4
    _assert_same_model(runs.final_params(cached), one_process, "2x4 cached, resumed 1x8 vs 1x8")


def _eval_args(workdir, eval_data, *extra):
    return ["eval", "--config", str(runs.REPO / "configs" / "demo.py"), "--workdir", str(workdir),
            "--config.data.image_size=64", "--config.eval.batch_size=8",
            "--config.eval.heatmaps_per_category=0", "--config.eval.curves=False",
            f"--config.eval.datasets.synthetic.root={eval_data}",
            f"--config.eval.datasets.synthetic.classes={EVAL_CLASSES!r}", *extra]


def test_two_process_eval_equals_one_process(mixing_model_dir, eval_data, tmp_path):
    """`addinov3 eval` as 2 processes x 4 devices gives the results of this process (8 devices)."""
    from addinov3_jax.commands.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    for w in (one, two):
        shutil.copytree(mixing_model_dir, w / "model")
    assert main(_eval_args(one, eval_data)) == 0
    _on_two_processes(_eval_args(two, eval_data))
    runs.assert_same_results(json.loads((one / "results.json").read_text()),
                             json.loads((two / "results.json").read_text()))
