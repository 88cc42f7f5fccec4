"""Training: the loss decreases with one compilation, the feature cache (device, disk) trains
bitwise like no cache, ArrayRecord input trains like the raw files, a missing dataset is refused.
Checkpointing, sharding and several processes: test_checkpointing, test_sharding,
test_distributed."""

import json

import numpy as np
import pytest
import runs

from addinov3_jax.runtime import trainer as train


def test_loss_decreases_and_one_compilation(train_data, tmp_path):
    """On the random tiny towers, as the demo trains (the other training tests read them saved)."""
    cfg = runs.tiny_config(train_data, epochs=12, lr=3e-3, warmup_fraction=0.25)
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


def test_cached_equals_uncached(train_data, tiny_towers, tmp_path):
    results = {}
    for mode in ("off", "device", "disk"):
        train.train(runs.tiny_config(train_data, tiny_towers, feature_cache=mode), tmp_path / mode)
        results[mode] = runs.final_params(tmp_path / mode)
    for mode in ("device", "disk"):
        for k, v in results["off"].items():
            np.testing.assert_array_equal(results[mode][k], v, err_msg=f"{mode}: {k}")
    assert (tmp_path / "disk" / "feature_cache" / "patches.npy").is_file()


def test_training_from_arrayrecord_equals_raw(train_data, tiny_towers, tmp_path):
    from addinov3_jax.data import tfds_builders

    tfds_builders.build("synthetic", train_data, tmp_path / "tfds")
    raw = runs.tiny_config(train_data, tiny_towers, epochs=2)
    raw.data.classes = ()  # the built dataset holds every class of the folder
    stored = runs.tiny_config(train_data, tiny_towers, epochs=2)
    stored.data.classes = ()
    stored.data.source = "tfds"
    stored.data.tfds_data_dir = str(tmp_path / "tfds")
    train.train(raw, tmp_path / "raw")
    train.train(stored, tmp_path / "stored")
    a, b = runs.final_params(tmp_path / "raw"), runs.final_params(tmp_path / "stored")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_synthetic_root_is_refused(tmp_path):
    cfg = runs.tiny_config(tmp_path / "typo")
    with pytest.raises(Exception, match="no such dataset folder"):
        train.train(cfg, tmp_path / "run")
    assert not (tmp_path / "typo").exists()
