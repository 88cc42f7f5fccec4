"""Checkpointing and the workdir: SIGKILL and Ctrl-C then resume equal the uninterrupted run
(bitwise), stop-after then resume, corrupt checkpoints fall back, torn metrics lines, checkpoints
of another run refused, the workdir lock, finished and unwritable workdirs."""

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import runs

from addinov3_jax.runtime import test_hooks
from addinov3_jax.runtime import trainer as train


def test_kill_and_resume_equals_uninterrupted(train_data, tiny_towers, tmp_path, capsys):
    """SIGKILL right after step 5 (deterministic: a test hook in the loop, checkpoints at 2 and 4
    are on disk), then the same command resumes; the result is bitwise the uninterrupted one.
    Only the killed run needs its own process; the others run the same command in-process."""
    from addinov3_jax.commands.cli import main

    assert main(runs.train_args(train_data, tiny_towers, tmp_path / "full", 6)) == 0
    killed = subprocess.run(runs.train_cmd(train_data, tiny_towers, tmp_path / "killed", 6),
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **{test_hooks.SIGNAL_AFTER_STEP_ENV: "5:SIGKILL"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model").exists()
    capsys.readouterr()
    assert main(runs.train_args(train_data, tiny_towers, tmp_path / "killed", 6)) == 0
    assert "resuming from step 4 of 12" in capsys.readouterr().out
    a, b = runs.final_params(tmp_path / "full"), runs.final_params(tmp_path / "killed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows]
    assert steps == list(range(1, 13)), steps  # rows 5 (after the kept checkpoint) not repeated
    assert main(runs.train_args(train_data, tiny_towers, tmp_path / "killed", 6)) == 0
    assert "already finished" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_resumable(train_data, tiny_towers, tmp_path, capsys):
    """Ctrl-C (SIGINT right after step 3): a checkpoint at step 3, one line, exit 130; the same
    command then resumes from step 3 and finishes."""
    from addinov3_jax.commands.cli import main

    res = subprocess.run(runs.train_cmd(train_data, tiny_towers, tmp_path, 3), capture_output=True, text=True,
                         timeout=600,
                         env=dict(os.environ, **{test_hooks.SIGNAL_AFTER_STEP_ENV: "3:SIGINT"}))
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "interrupted at step 3 of 6; rerun the same command to resume" in res.stderr
    assert (tmp_path / "checkpoints" / "3").is_dir() and not (tmp_path / "model").exists()
    assert main(runs.train_args(train_data, tiny_towers, tmp_path, 3)) == 0
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.json").is_file()


def test_stop_after_then_resume_equals_uninterrupted(train_data, tiny_towers, tmp_path):
    full = train.train(runs.tiny_config(train_data, tiny_towers, epochs=3), tmp_path / "full")
    part = train.train(runs.tiny_config(train_data, tiny_towers, epochs=3, stop_after=3), tmp_path / "part")
    assert part["steps"] == 3 and not (tmp_path / "part" / "model").exists()
    rest = train.train(runs.tiny_config(train_data, tiny_towers, epochs=3), tmp_path / "part")
    assert rest["resumed_from"] == 3 and rest["steps"] == full["steps"]
    a, b = runs.final_params(tmp_path / "full"), runs.final_params(tmp_path / "part")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_checkpoint_falls_back(train_data, tiny_towers, tmp_path, capsys):
    cfg = runs.tiny_config(train_data, tiny_towers, checkpoint_every=2, keep_checkpoints=5)
    train.train(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    newest = tmp_path / "checkpoints" / str(steps[-1])
    for f in (newest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    cfg.train.epochs = 4  # continue past the corrupt checkpoint
    shutil.rmtree(tmp_path / "model")
    summary = train.train(cfg, tmp_path)
    assert summary["resumed_from"] == steps[-2]
    assert "unreadable" in capsys.readouterr().err


def test_lock_finished_and_unwritable(train_data, tiny_towers, tmp_path):
    import socket

    work = tmp_path / "w"
    work.mkdir()
    (work / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
        train.train(runs.tiny_config(train_data, tiny_towers), work)
    (work / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    train.train(runs.tiny_config(train_data, tiny_towers, epochs=1), work)  # a stale lock is taken over
    assert not (work / ".lock").exists()
    blocker = tmp_path / "a_file"  # a workdir below a file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        train.train(runs.tiny_config(train_data, tiny_towers), blocker / "run")


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill in the middle of a metrics.jsonl write leaves a torn last line: resume drops it."""
    rows = [json.dumps({"step": i, "loss": 1.0}) for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    writer = train._Writers(tmp_path, True, resume_step=2)
    writer.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoints_of_another_run_are_refused(train_data, tiny_towers, tmp_path):
    train.train(runs.tiny_config(train_data, tiny_towers, epochs=1, stop_after=1), tmp_path)
    other = runs.tiny_config(train_data, tiny_towers, epochs=1)
    other.model.feature_layers = (3, 2, 1, 0)
    with pytest.raises(ValueError, match="model.feature_layers"):
        train.train(other, tmp_path)
