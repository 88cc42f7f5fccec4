"""Few-shot evaluation and prediction: shots=0 is the zero-shot path bitwise, references come from
the train split only, the results schema (shots, seeds, per_seed, mean_std), the one-pass
Predictor step and `predict --reference` (the config fields: test_config)."""

import json
from pathlib import Path

import fewshot_reference as reference
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from addinov3_jax.data import readers
from addinov3_jax.data.records import DataError
from addinov3_jax.io import model_dir
from addinov3_jax.models import fewshot
from addinov3_jax.models import model as ad
from addinov3_jax.runtime import distributed, inference
from addinov3_jax.runtime import evaluator as evaluate

OPTS = evaluate.EvalOptions(image_size=64, batch_size=8, heatmaps_per_category=0, curves=False)


@pytest.fixture(scope="module")
def syn(eval_data):
    """conftest's `eval_data` (pill and weave)."""
    return eval_data


def _numbers(results):
    return json.dumps(results["datasets"], sort_keys=True)


def test_shots_zero_is_the_zero_shot_path_bitwise(tiny, syn, tmp_path):
    data = [("synthetic", str(syn), ("pill", "weave"))]
    plain = evaluate.evaluate(tiny, data, tmp_path / "plain", opts=OPTS)
    zero = evaluate.evaluate(tiny, data, tmp_path / "zero", opts=OPTS,
                             fewshot_config=fewshot.FewShotConfig(shots=0, seeds=(3, 4)))
    assert _numbers(plain) == _numbers(zero)
    assert zero["shots"] == 0 and "seeds" not in zero
    assert "per_seed" not in zero["datasets"]["synthetic"]


def test_one_backbone_pass_step(tiny, rng):
    images = rng.standard_normal((8, 64, 64, 3)).astype(np.float32)
    refs = rng.standard_normal((3, 64, 64, 3)).astype(np.float32)
    cfg = tiny.config
    text = jnp.asarray(rng.standard_normal((8, tiny.text_dim, 2)), jnp.float32)
    adapters = ad.trainable_params(tiny)
    step = nnx.jit(ad.predict_step, static_argnames=("cfg", "with_taps"))
    maps, scores = step(tiny.backbone, adapters, images, text, cfg=cfg)
    with_taps = step(tiny.backbone, adapters, images, text, cfg=cfg, with_taps=True)
    np.testing.assert_array_equal(with_taps[0], maps)  # the taps change nothing zero-shot
    np.testing.assert_array_equal(with_taps[1], scores)
    np.testing.assert_allclose(with_taps[2], reference.features(tiny.backbone, images,
                                                                cfg.feature_layers), atol=1e-6)

    # The Predictor's fused step: few-shot only ("none") = fewshot.predict on standalone features.
    fs = fewshot.FewShotConfig(fusion="none", smoothing_sigma=2.0)
    pred = inference.Predictor(tiny, distributed.default_mesh(8), fewshot_config=fs)
    bank = pred.build_bank(refs, seed=0, batch_size=8)
    ref_bank = reference.build_bank(tiny.backbone, refs, cfg.feature_layers, fs)
    assert bank.rows == ref_bank.rows == 3 * 16 and bank.shots == 3
    np.testing.assert_allclose(bank.features_lmd, ref_bank.features_lmd, atol=1e-6)
    table = pred.text_table(["object"])
    ids = np.zeros(8, np.int32)
    maps, scores = pred(images, ids, table, bank=bank)
    want = reference.predict(ref_bank, reference.features(tiny.backbone, images,
                                                          cfg.feature_layers), (4, 4), (64, 64), fs)
    np.testing.assert_allclose(maps, want[0], atol=1e-5)
    np.testing.assert_allclose(scores, want[1], atol=1e-5)
    # A bank's own images have (almost) nothing anomalous.
    own_maps, _ = pred(np.concatenate([refs, images[:5]]), ids, table, bank=bank)
    assert float(np.abs(np.asarray(own_maps)[:3]).max()) < 1e-4


def test_eval_with_shots_writes_the_schema_and_train_references(tiny, syn, tmp_path):
    fs = fewshot.FewShotConfig(shots=1, seeds=(0, 1))
    r = evaluate.evaluate(tiny, [("synthetic", str(syn), ("pill", "weave"))], tmp_path, opts=OPTS,
                          fewshot_config=fs)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["shots"] == 1 and saved["seeds"] == [0, 1]
    entry = saved["datasets"]["synthetic"]
    assert set(entry) >= {"categories", "mean", "per_seed", "mean_std", "references"}
    assert set(entry["per_seed"]) == {"0", "1"}
    for cls in ("pill", "weave"):
        rows = [entry["per_seed"][s]["categories"][cls] for s in ("0", "1")]
        for k in evaluate.METRIC_KEYS:
            assert entry["categories"][cls][k] == pytest.approx(np.mean([row[k] for row in rows]))
    means = [entry["per_seed"][s]["mean"]["pixel_auroc"] for s in ("0", "1")]
    assert entry["mean_std"]["pixel_auroc"] == pytest.approx(np.std(means))
    assert set(entry["mean"]) == set(evaluate.METRIC_KEYS) | {"num_images"}
    # The references: one train/good image per class and seed, never a test image.
    tests = {rec.image_path for rec in readers.read("synthetic", syn, split="test")[0]}
    for cls, per in entry["references"].items():
        assert set(per) == {"0", "1"}
        for paths in per.values():
            assert len(paths) == 1
            assert Path(paths[0]).parent == Path(syn).resolve() / cls / "train" / "good"
            assert paths[0] not in tests
    assert r["datasets"]["synthetic"]["mean"] == entry["mean"]
    assert "1-shot" in (tmp_path / "results.md").read_text()


def test_sharded_bank_equals_replicated_bank(tiny, syn, tmp_path):
    """`shard_bank=True` splits the bank's rows over the 8 devices: same metrics within 1e-6."""

    runs = {}
    for shard in (False, True):
        fs = fewshot.FewShotConfig(shots=2, seeds=(0,), shard_bank=shard)
        runs[shard] = evaluate.evaluate(tiny, [("synthetic", str(syn), ("pill",))],
                                        tmp_path / str(shard), opts=OPTS, fewshot_config=fs,
                                        mesh=distributed.make_mesh(8, 1, 1))
    a, b = (runs[k]["datasets"]["synthetic"]["categories"]["pill"] for k in (False, True))
    for k in evaluate.METRIC_KEYS:
        assert b[k] == pytest.approx(a[k], abs=1e-6), k


def test_folder_dataset_refuses_test_images_as_references(tiny, tmp_path):
    for sub in ("normal", "anomalous"):
        for i in range(2):
            img = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
            path = tmp_path / "data" / "part" / sub / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    with pytest.raises(DataError, match="shares 4 image"):
        evaluate.evaluate(tiny, [("folder", str(tmp_path / "data"))], tmp_path / "out", opts=OPTS,
                          fewshot_config=fewshot.FewShotConfig(shots=1))


def test_predict_with_reference_folder(tiny, syn, tmp_path, capsys):
    model_dir.save(tiny, tmp_path / "model")
    from addinov3_jax.commands.cli import main

    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(tmp_path / "model"), "--class-name", "pill", "--output",
            str(out), "--image-size", "64", "--batch-size", "2", "--save-maps"]
    test_dir = syn / "pill" / "test" / "crack"
    assert main([*args, "--reference", str(syn / "pill" / "train" / "good"), "--augment", "flip",
                 str(test_dir)]) == 0
    assert "memory bank" in capsys.readouterr().out
    meta = json.loads((out / "scores.json").read_text())
    assert meta["reference"]["count"] == 3 and meta["reference"]["augment"] == "flip"
    assert meta["reference"]["bank_rows"] == 3 * 3 * 16
    n = len(list(test_dir.glob("*.png")))  # per_defect images
    assert len(meta["images"]) == n == len(list((out / "maps").glob("*.npy")))
    assert list((out / "heatmaps").glob("*.png"))
    assert main([*args, "--fusion", "none", str(test_dir)]) == 2  # --fusion needs --reference
    assert "need --reference" in capsys.readouterr().err
