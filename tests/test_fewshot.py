"""Few-shot memory bank: exact kNN against NumPy brute force (blocked, sharded), views, coreset
against a NumPy greedy k-center, reference sampling, fusion, and an end-to-end defect check."""

import dataclasses

import fewshot_reference as reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from addinov3_jax.data import pipeline, readers, references, synthetic
from addinov3_jax.data.records import DataError, Record
from addinov3_jax.models import dinov3, fewshot
from addinov3_jax.runtime import distributed, steps


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force_scores(bank_lmd, patches_lbnd):
    """1 - max cosine per layer, averaged over layers, in float64 (B, N)."""
    b64, p64 = np.float64(bank_lmd), np.float64(patches_lbnd)
    sims = np.einsum("lbnd,lmd->lbnm", p64, b64).max(-1)
    return (1 - sims).mean(0)


def random_bank(rng, layers=3, m=37, d=16):
    return unit(rng.standard_normal((layers, m, d))).astype(np.float32)


@pytest.mark.parametrize("block_size", [1, 5, 8, 37, 4096])  # 37 rows: not a multiple of 5 or 8
def test_knn_matches_brute_force(rng, block_size):
    bank_lmd = random_bank(rng)
    patches = unit(rng.standard_normal((3, 2, 6, 16))).astype(np.float32)
    bank = fewshot.MemoryBank(jnp.asarray(bank_lmd), 37, shots=1, seed=0)
    got = fewshot.patch_scores(bank, jnp.asarray(patches), block_size=block_size)
    np.testing.assert_allclose(got, brute_force_scores(bank_lmd, patches), atol=1e-6, rtol=0)


def test_knn_exact_ties_and_members(rng):
    """Queries that are bank rows score 0; a row repeated in several blocks does not matter."""
    row = unit(rng.standard_normal((1, 1, 16)))
    bank_lmd = np.concatenate([row, random_bank(rng, 1, 10), row, row], axis=1).astype(np.float32)
    patches = np.concatenate([np.tile(row, (1, 3, 1)), bank_lmd[:, 3:6]], axis=1)[:, None]
    bank = fewshot.MemoryBank(jnp.asarray(bank_lmd), 13, shots=1, seed=0)
    for block in (3, 4, 13):
        got = fewshot.patch_scores(bank, jnp.asarray(patches), block_size=block)
        np.testing.assert_allclose(got, brute_force_scores(bank_lmd, patches), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got, 0, atol=1e-6)


def test_knn_all_similarities_negative(rng):
    """Padding rows must never win: here every similarity is negative (a zero row would give 0)."""
    e0 = np.eye(16)[0]
    bank_lmd = unit(rng.standard_normal((2, 37, 16)) + 6 * e0).astype(np.float32)
    patches = unit(rng.standard_normal((2, 1, 4, 16)) * 0.1 - e0).astype(np.float32)
    assert (np.einsum("lbnd,lmd->lbnm", patches, bank_lmd) < -0.5).all()
    bank = fewshot.MemoryBank(jnp.asarray(bank_lmd), 37, shots=1, seed=0)
    for block in (5, 8, 36):
        got = fewshot.patch_scores(bank, jnp.asarray(patches), block_size=block)
        np.testing.assert_allclose(got, brute_force_scores(bank_lmd, patches), atol=1e-6, rtol=0)
    mesh = distributed.make_mesh()  # 37 rows padded to 40 over 8 shards
    got = fewshot.patch_scores(fewshot.shard_bank(bank, mesh), jnp.asarray(patches), block_size=4,
                               mesh=mesh)
    np.testing.assert_allclose(got, brute_force_scores(bank_lmd, patches), atol=1e-6, rtol=0)


def test_sharded_bank_matches_unsharded(rng):
    assert jax.device_count() == 8
    bank_lmd = random_bank(rng, layers=2, m=45, d=8)  # 45 rows: padded to 48 over 8 shards
    patches = unit(rng.standard_normal((2, 3, 5, 8))).astype(np.float32)
    bank = fewshot.MemoryBank(jnp.asarray(bank_lmd), 45, shots=1, seed=0)
    mesh = distributed.make_mesh()
    sharded = fewshot.shard_bank(bank, mesh)
    assert sharded.features_lmd.shape[1] == 48
    assert len(sharded.features_lmd.sharding.device_set) == 8
    assert sharded.features_lmd.addressable_shards[0].data.shape == (2, 6, 8)
    got = fewshot.patch_scores(sharded, jnp.asarray(patches), block_size=4, mesh=mesh)
    np.testing.assert_allclose(got, brute_force_scores(bank_lmd, patches), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, fewshot.patch_scores(bank, jnp.asarray(patches)), atol=1e-7)


@pytest.mark.parametrize("augment,angles", [("none", ()), ("flip", ()), ("rot90", (10.0,)),
                                            ("dihedral", (-10.0, 10.0))])
def test_views_and_bank_size(rng, augment, angles):
    images = jnp.asarray(rng.standard_normal((2, 32, 48, 3)), jnp.float32)
    views = fewshot.augment_views(images, augment, angles)
    cfg = fewshot.FewShotConfig(augment=augment, rotation_angles=angles)
    assert len(views) == cfg.views == fewshot.AUGMENTS[augment] + len(angles)
    np.testing.assert_array_equal(views[0], images)
    assert len({np.asarray(v).tobytes() for v in views}) == len(views)  # all distinct
    # A feature per pixel block stands in for a backbone: rows = shots x views x patches.
    feats = [jnp.stack([unit(np.asarray(v).reshape(2, -1, 16))] * 2) for v in views]
    bank = fewshot.bank_from_features(feats, cfg)
    assert bank.features_lmd.shape == (2, 2 * cfg.views * 32 * 48 * 3 // 16, 16)
    assert bank.rows == bank.features_lmd.shape[1] and bank.shots == 2


def test_small_rotation_keeps_centre_and_quarter_turns():
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    np.testing.assert_allclose(fewshot._rotate(x, 0.0), x, atol=1e-5)
    np.testing.assert_allclose(fewshot._rotate(x, 90.0)[:, 2, 2], x[:, 2, 2], atol=1e-5)
    # Exact quarter turn through the interpolator equals np.rot90 (one direction or the other).
    r = np.asarray(fewshot._rotate(x, 90.0))
    assert any(np.allclose(r, np.rot90(x, k, axes=(1, 2)), atol=1e-4) for k in (1, 3))


def numpy_greedy(x, count, start):
    x = np.float64(x)
    picks = [start]
    d = ((x - x[start]) ** 2).sum(-1)
    for _ in range(count - 1):
        picks.append(int(np.argmax(d)))
        d = np.minimum(d, ((x - x[picks[-1]]) ** 2).sum(-1))
    return picks


def test_coreset_matches_numpy_greedy(rng):
    x = rng.standard_normal((200, 6)).astype(np.float32)
    x[[17, 99, 150]] += 40 * unit(rng.standard_normal((3, 6)))  # far outliers: the first picks
    got = np.asarray(fewshot.greedy_coreset(jnp.asarray(x), 25, start=3))
    assert len(got) == 25 and len(set(got.tolist())) == 25
    assert got.tolist() == numpy_greedy(x, 25, 3)
    assert set(got[1:4].tolist()) == {17, 99, 150}


def test_coreset_bank_ratio(rng):
    feats = [jnp.asarray(unit(rng.standard_normal((2, 3, 40, 8))), jnp.float32)]
    cfg = fewshot.FewShotConfig(coreset_ratio=0.25, coreset_projection_dim=4)
    bank = fewshot.bank_from_features(feats, cfg, seed=1)
    full = np.asarray(feats[0]).reshape(2, 120, 8)
    assert bank.features_lmd.shape == (2, 30, 8) and bank.rows == 30
    # Every kept row is a row of the full bank, the same row index in every layer.
    idx = [int(np.argmax(full[0] @ r)) for r in np.asarray(bank.features_lmd[0])]
    np.testing.assert_allclose(bank.features_lmd, full[:, idx], atol=0)
    again = fewshot.bank_from_features(feats, cfg, seed=1)
    np.testing.assert_array_equal(bank.features_lmd, again.features_lmd)


def rec(split, cls="a", i=0, label=0, dataset="d"):
    return Record(dataset, split, cls, cls, f"/x/{cls}/{split}/good/{i:03d}.png", None, label, "good")


def test_sample_references():
    train = [rec("train", i=i) for i in range(10)]
    a = references.sample_references(train, 4, seed=0)
    assert a == references.sample_references(list(reversed(train)), 4, seed=0)  # order-free
    assert len({r.image_path for r in a}) == 4
    draws = {tuple(r.image_path for r in references.sample_references(train, 4, s)) for s in range(5)}
    assert len(draws) > 1  # seeds differ
    assert references.sample_references(train, 0, seed=0) == []
    with pytest.raises(DataError, match="d/a: 11 reference image.*only 10"):
        references.sample_references(train, 11, seed=0)
    with pytest.raises(DataError, match="train split"):
        references.sample_references(train + [rec("test", i=99)], 2, seed=0)
    with pytest.raises(DataError, match="one class"):
        references.sample_references(train + [rec("train", cls="b")], 2, seed=0)
    # Anomalous train records (not in MVTec, but in user folders) are never drawn.
    mixed = train[:3] + [rec("train", i=50 + i, label=1) for i in range(5)]
    assert all(r.label == 0 for r in references.sample_references(mixed, 3, seed=1))


def test_fuse_without_bank_is_the_zero_shot_input(rng):
    maps = jnp.asarray(rng.random((2, 8, 8)), jnp.float32)
    scores = jnp.asarray(rng.random(2), jnp.float32)
    for mode in fewshot.FUSIONS:
        m, s = fewshot.fuse(maps, scores, None, None, mode, 3.0)
        assert m is maps and s is scores
    fm, fs = jnp.full((2, 8, 8), 0.5), jnp.full(2, 0.25)
    m, s = fewshot.fuse(maps, scores, fm, fs, "add", 2.0)
    np.testing.assert_allclose(m, maps + 0.5, atol=1e-7)
    np.testing.assert_allclose(s, scores + 0.25, atol=1e-7)
    assert fewshot.fuse(maps, scores, fm, fs, "none")[0] is fm


def test_config_validation():
    with pytest.raises(ValueError, match=r"augment must be one of \('none', 'flip'"):
        fewshot.FewShotConfig(augment="rotate")
    with pytest.raises(ValueError, match="fusion must be one of"):
        fewshot.FewShotConfig(fusion="mean")
    with pytest.raises(ValueError, match="coreset_ratio"):
        fewshot.FewShotConfig(coreset_ratio=0)
    assert fewshot.FewShotConfig(seeds=[0, 1]).seeds == (0, 1)


def test_image_scores():
    s = jnp.asarray(np.arange(300, dtype=np.float32)[None])
    np.testing.assert_allclose(fewshot.image_scores(s, "mean_top", 0.01), [298.0])  # top 3
    np.testing.assert_allclose(fewshot.image_scores(s[:, :50], "mean_top", 0.01), [49.0])
    np.testing.assert_allclose(fewshot.image_scores(s, "max"), [299.0])


@pytest.fixture(scope="module")
def weave(synthetic_data):
    return synthetic_data(("weave",), size=128, normal=2, per_defect=2, train_normal=4)


def test_end_to_end_defects_score_higher(weave):
    train, _ = readers.read("synthetic", weave, split="train", validate=False)
    test, _ = readers.read("synthetic", weave, split="test", validate=False)
    refs = references.sample_references(train, 4, seed=0)
    assert all("/train/good/" in r.image_path for r in refs)
    pre = pipeline.Preprocess(size=(128, 128))
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    cfg = fewshot.FewShotConfig(augment="flip", smoothing_sigma=2.0)
    layers = (3, 1)
    ref_images = pipeline.load_images([r.image_path for r in refs], 128)
    bank = reference.build_bank(backbone, ref_images, layers, cfg, seed=0)
    assert bank.rows == 4 * 3 * 64 and bank.features_lmd.shape == (2, 768, 64)
    examples = [pre(pipeline.record_to_example(r)) for r in test]  # 2 normal, 6 defective
    images = jnp.asarray(np.stack([e["image"] for e in examples]))
    masks = np.stack([e["mask"] for e in examples]) > 0
    labels = np.array([r.label for r in test])
    maps, scores = reference.predict(bank, reference.features(backbone, images, layers), (8, 8),
                                     (128, 128), cfg)
    maps, scores = np.asarray(maps), np.asarray(scores)
    for m, mask in zip(maps[labels == 1], masks[labels == 1], strict=True):
        assert m[mask].mean() > 2 * m[~mask].mean()
    assert scores[labels == 0].max() < scores[labels == 1].min()
    # The bank's own images score ~0: every reference patch is in the bank.
    own = fewshot.patch_scores(bank, reference.features(backbone, ref_images, layers))
    np.testing.assert_allclose(own, 0, atol=1e-5)


def test_synthetic_train_split_and_refusal(weave):
    train, _ = readers.read("synthetic", weave, split="train", validate=False)
    assert len(train) == 4 and all(r.split == "train" and r.label == 0 for r in train)
    with pytest.raises(DataError, match="synthetic/weave: 5 reference"):
        references.sample_references(train, 5, seed=0)


def test_reference_paths(weave, tmp_path):
    paths = references.reference_paths(weave / "weave" / "train" / "good")
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png", "003.png"]
    with pytest.raises(DataError, match="no reference images"):
        references.reference_paths(tmp_path)


def test_bank_is_a_pytree(rng):
    bank = fewshot.MemoryBank(jnp.asarray(random_bank(rng)), 37, shots=2, seed=5)
    leaves, tree = jax.tree.flatten(bank)
    assert len(leaves) == 1
    back = jax.tree.unflatten(tree, leaves)
    assert dataclasses.replace(back, features_lmd=None) == dataclasses.replace(bank, features_lmd=None)
    assert bank.nbytes == 3 * 37 * 16 * 4


def test_synthetic_train_images_leave_the_test_images_alone(tmp_path):
    kw = dict(categories=("pill",), size=64, normal=1, per_defect=1)
    a = synthetic.generate(tmp_path / "a", train_normal=1, **kw)
    b = synthetic.generate(tmp_path / "b", train_normal=3, **kw)
    tests = sorted(p.relative_to(a) for p in a.rglob("*.png") if "train" not in p.parts)
    assert len(tests) == 1 + 3 * 2  # normal, 3 defects, 3 masks
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in tests)
    assert (a / "pill/train/good/000.png").read_bytes() == (b / "pill/train/good/000.png").read_bytes()
    assert len(list((b / "pill/train/good").iterdir())) == 3


def test_taps_step_gives_final_normed_taps_in_the_given_order(rng):
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    graphdef, state = nnx.split(backbone)
    got = steps.taps_step(state, x, graphdef=graphdef, layers=(3, 1))
    taps = backbone.get_intermediate_layers(x, n=(1, 3), norm=True)  # ascending: blocks 1, 3
    np.testing.assert_allclose(got[0], unit(np.asarray(taps[1])), atol=1e-5)
    np.testing.assert_allclose(got[1], unit(np.asarray(taps[0])), atol=1e-5)
