"""AD-DINOv3 head and model: upsampling, the whole forward against a PyTorch statement of the
official computation, losses against the official formulas, gradients, adapter checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from addinov3_jax.io import checkpoint_io, model_dir, towers
from addinov3_jax.models import clip_text, dinov3, losses
from addinov3_jax.models import model as ad
from weight_conversion import adapters as adapter_conv

TAPS = (1, 3, 0, 2)  # any order; on the 4-block tiny backbone


def tiny_model(text_layout="interleave", seed=0, **kw):
    cfg = ad.HeadConfig(feature_layers=TAPS, text_layout=text_layout, **kw)
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(seed))
    text = clip_text.create("tiny", rngs=nnx.Rngs(seed + 1))
    return ad.ADDinoV3(backbone, text, cfg, rngs=nnx.Rngs(seed + 2))


@pytest.mark.parametrize("grid,out", [((32, 32), (512, 512)), ((4, 5), (64, 80)),
                                      ((3, 7), (50, 21)), ((1, 4), (5, 9)), ((6, 6), (6, 6))])
def test_upsample_matches_torch(rng, grid, out):
    x = rng.standard_normal((2, *grid, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode="bilinear",
                        align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ad.upsample_bilinear(jnp.asarray(x), out), ref, atol=1e-6, rtol=0)


def official_forward(patches, cls, text, w_patch, w_cls, w_prompt, out_size, layout):
    """The official AD-DINOv3 computation, restated in PyTorch (float64) from the method description.

    patches (L, B, N, D) raw (unstandardised) tapped tokens, cls (L, B, D), text (B, E, 2).
    """
    t = lambda a: torch.from_numpy(np.array(a, np.float64))  # noqa: E731 - exact reference
    text = t(text)
    f0 = F.leaky_relu(text[:, :, 0] @ t(w_prompt[0]))
    f1 = F.leaky_relu(text[:, :, 1] @ t(w_prompt[1]))
    b, e = f0.shape
    if layout == "interleave":
        adjusted = torch.cat([f0, f1], dim=1).view(b, e, 2)
    else:
        adjusted = torch.stack([f0, f1], dim=-1)
    maps, aware, scores = [], [], []
    h, w = out_size[0] // 16, out_size[1] // 16
    for i in range(patches.shape[0]):
        tokens = t(patches[i])
        tokens = (tokens - tokens.mean(dim=1, keepdim=True)) / (tokens.std(dim=1, keepdim=True) + 1e-6)
        c = F.leaky_relu(t(cls[i]) @ t(w_cls[i]))
        c = c / c.norm(dim=-1, keepdim=True)
        p = F.leaky_relu(tokens @ t(w_patch[i]))
        p = p / p.norm(dim=-1, keepdim=True)
        cm = 100 * p @ adjusted
        cm = F.interpolate(cm.permute(0, 2, 1).reshape(-1, 2, h, w), size=out_size, mode="bilinear",
                           align_corners=True)
        maps.append(torch.softmax(cm, dim=1))
        aw = 10 * p @ c.unsqueeze(-1)
        aw = torch.sigmoid(F.interpolate(aw.permute(0, 2, 1).reshape(-1, 1, h, w), size=out_size,
                                         mode="bilinear", align_corners=True))
        aware.append(torch.cat([1 - aw, aw], dim=1))
        scores.append(100 * (c.unsqueeze(1) @ adjusted).squeeze(1))
    mean = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    return (mean(maps).permute(0, 2, 3, 1).numpy(), mean(aware).permute(0, 2, 3, 1).numpy(),
            mean(scores).numpy())


@pytest.mark.parametrize("layout", ["interleave", "stack"])
def test_forward_matches_official_statement(rng, layout):
    model = tiny_model(layout)
    # Random (non-init) adapters; unit-norm text prototypes like the real ones.
    for name in ("patch", "cls", "prompt"):
        var = getattr(model.adapters, name)
        scale = 1.5 / np.sqrt(var.shape[1])
        var.set_value(jnp.asarray(rng.standard_normal(var.shape).astype(np.float32) * scale))
    images = rng.standard_normal((2, 64, 48, 3)).astype(np.float32)
    text = rng.standard_normal((2, model.text_dim, 2)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    out = model(images, text)
    taps = model.backbone.get_intermediate_layers(images, n=TAPS, return_class_token=True)
    by_block = dict(zip(sorted(TAPS), taps, strict=True))
    patches = np.stack([np.asarray(by_block[i][0]) for i in TAPS])
    cls = np.stack([np.asarray(by_block[i][1]) for i in TAPS])
    a = model.adapters
    m_ref, a_ref, g_ref = official_forward(patches, cls, text, a.patch[...], a.cls[...],
                                           a.prompt[...], (64, 48), layout)
    np.testing.assert_allclose(out["M"], m_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["A"], a_ref, atol=1e-5, rtol=0)
    # g = 100 x cosine reaches ~40, where one fp32 ulp is 3.8e-6: allow 1e-6 relative on top.
    np.testing.assert_allclose(out["g"], g_ref, atol=1e-5, rtol=1e-6)


def test_layouts():
    t_n, t_a = jnp.arange(4.0)[None], 10 + jnp.arange(4.0)[None]
    np.testing.assert_array_equal(ad.arrange_text(t_n, t_a, "stack")[0], [[0, 10], [1, 11], [2, 12], [3, 13]])
    # Official concat-then-view: column 0 = even coordinates of [t_n, t_a], column 1 = odd ones.
    np.testing.assert_array_equal(ad.arrange_text(t_n, t_a, "interleave")[0, :, 0], [0, 2, 10, 12])
    np.testing.assert_array_equal(ad.arrange_text(t_n, t_a, "interleave")[0, :, 1], [1, 3, 11, 13])


def torch_focal(probs_bkhw, mask_bhw, gamma=2, smooth=1e-5):
    """The official FocalLoss on probabilities (no alpha), restated."""
    b, k = probs_bkhw.shape[:2]
    logit = probs_bkhw.reshape(b, k, -1).permute(0, 2, 1).reshape(-1, k)
    target = mask_bhw.reshape(-1, 1).long()
    one_hot = torch.zeros(target.shape[0], k, dtype=probs_bkhw.dtype).scatter_(1, target, 1)
    one_hot = torch.clamp(one_hot, smooth / (k - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def torch_dice(prob_bhw, mask_bhw):
    n = prob_bhw.shape[0]
    i, t = prob_bhw.reshape(n, -1), mask_bhw.reshape(n, -1)
    eff = (2 * (i * t).sum(1) + 1) / (i.sum(1) + t.sum(1) + 1)
    return 1 - eff.sum() / n


@pytest.mark.parametrize("empty", [False, True])
def test_losses_match_official_formulas(rng, empty):
    logits = rng.standard_normal((3, 40, 24, 2)).astype(np.float32) * 3
    probs = np.array(jax.nn.softmax(logits, axis=-1))
    probs[0, 0, 0] = [1.0, 0.0]  # saturated pixels exercise the clamping / smoothing constants
    mask = (rng.random((3, 40, 24)) > 0.7).astype(np.float32)
    if empty:
        mask[:] = 0
    mask[1] = 0  # always one image with an empty mask
    # The reference runs in float64, so the comparison measures our fp32 error alone.
    tp = torch.from_numpy(probs).double().permute(0, 3, 1, 2)
    tm = torch.from_numpy(mask).double()
    np.testing.assert_allclose(losses.focal(probs, mask), torch_focal(tp, tm).item(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(losses.dice(probs[..., 1], mask), torch_dice(tp[:, 1], tm).item(),
                               atol=1e-6, rtol=0)
    g = rng.standard_normal((3, 2)).astype(np.float32) * 5
    labels = np.array([1, 0, 1])
    np.testing.assert_allclose(losses.cross_entropy(g, labels),
                               F.cross_entropy(torch.from_numpy(g), torch.from_numpy(labels)).item(),
                               atol=1e-6, rtol=0)
    a_probs = probs[..., ::-1].copy()
    total = losses.total({"M": probs, "A": a_probs, "g": g}, mask, labels)
    ta = torch.from_numpy(a_probs).double().permute(0, 3, 1, 2)
    expected = (0.25 * (torch_focal(ta, tm) + torch_dice(ta[:, 1], tm))
                + 0.5 * (torch_focal(tp, tm) + torch_dice(tp[:, 1], tm))
                + 0.25 * F.cross_entropy(torch.from_numpy(g).double(), torch.from_numpy(labels)))
    np.testing.assert_allclose(total["loss"], expected.item(), atol=1e-6, rtol=0)


def test_gradient_reaches_only_adapters(rng):
    model = tiny_model("stack")
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    text = rng.standard_normal((2, model.text_dim, 2)).astype(np.float32)
    mask = (rng.random((2, 32, 32)) > 0.8).astype(np.float32)

    def loss_fn(m):
        return losses.total(m(images, text), mask, jnp.array([1, 0]))["loss"]

    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param)))(model)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    adapters = {k: v for k, v in flat.items() if k.startswith("adapters.")}
    others = {k: v for k, v in flat.items() if not k.startswith("adapters.")}
    assert set(adapters) == {"adapters.patch", "adapters.cls", "adapters.prompt"}
    assert all(np.abs(v).max() > 0 for v in adapters.values())
    assert others and all(not v.any() for v in others.values()), "frozen towers got gradients"
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(ad.trainable(model))}
    assert trainable == set(adapters)


def test_predict_scores_and_smoothing(rng):
    model = tiny_model("stack", image_score="mean_of_both", smoothing_sigma=2.0)
    images = rng.standard_normal((3, 48, 64, 3)).astype(np.float32)
    maps, scores = model.predict(images, ["bottle", "screw", "bottle"])
    assert maps.shape == (3, 48, 64) and scores.shape == (3,)
    text = model.text_features(["bottle", "screw"])
    out = nnx.jit(lambda m, x, t: m(x, t))(model, images, text[[0, 1, 0]])
    from scipy.ndimage import gaussian_filter

    raw = np.asarray(out["M"][..., 1])
    unsmoothed = tiny_model("stack").predict(images, ["bottle", "screw", "bottle"])[0]
    np.testing.assert_allclose(unsmoothed, raw, atol=2e-6)  # sigmoid-of-difference path
    smooth = np.stack([gaussian_filter(m, sigma=2.0) for m in raw])
    np.testing.assert_allclose(maps, smooth, atol=1e-6)
    glob = np.asarray(jax.nn.softmax(out["g"])[:, 1])
    np.testing.assert_allclose(scores, 0.5 * (glob + smooth.reshape(3, -1).max(1)), atol=1e-6)


def official_adapter_file(path, rng, visual=64, text=64):
    sd = {}
    for group, n, d_in in (("cls_token_adapter", 4, visual), ("patch_token_adapter", 4, visual),
                           ("prompt_adapter", 2, text)):
        sd[group] = {}
        for i in range(n):
            sd[group][f"{i}.fc1.0.weight"] = torch.from_numpy(
                rng.standard_normal((text, d_in)).astype(np.float32))
            sd[group][f"{i}.fc2.0.weight"] = torch.from_numpy(
                rng.standard_normal((d_in, text)).astype(np.float32))
    torch.save(sd, path)
    return sd


def test_official_adapter_checkpoint(tmp_path, rng):
    sd = official_adapter_file(tmp_path / "99.pth", rng)
    from addinov3_jax.commands.cli import main

    assert main(["convert", "adapters", "--source", str(tmp_path / "99.pth"),
                 "--output", str(tmp_path / "adapters"), "--feature-layers", "1,3,0,2"]) == 0
    params, meta = adapter_conv.read(tmp_path / "adapters")
    assert meta["head"]["text_layout"] == "interleave" and meta["class_name_source"] == "path"
    np.testing.assert_array_equal(params["patch"][2], sd["patch_token_adapter"]["2.fc1.0.weight"].numpy().T)
    np.testing.assert_array_equal(params["prompt"][1], sd["prompt_adapter"]["1.fc1.0.weight"].numpy().T)
    back = adapter_conv.params_to_official(params)
    for group in back:
        for k, v in back[group].items():
            if "fc1" in k:
                np.testing.assert_array_equal(v, sd[group][k].numpy())
    # Used with the official layout, the converted adapters reproduce the official maps.
    base = tiny_model("interleave")
    model_dir.save(base, tmp_path / "model")
    model = model_dir.load(backbone=tmp_path / "model" / "backbone",
                           text_tower=tmp_path / "model" / "text_tower",
                    adapters=tmp_path / "adapters")
    assert model.config.text_layout == "interleave" and model.config.feature_layers == TAPS
    images = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
    text = rng.standard_normal((1, 64, 2)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    out = model(images, text)
    taps = dict(zip(sorted(TAPS), model.backbone.get_intermediate_layers(
        images, n=TAPS, return_class_token=True), strict=True))
    m_ref, _, _ = official_forward(
        np.stack([np.asarray(taps[i][0]) for i in TAPS]), np.stack([np.asarray(taps[i][1]) for i in TAPS]),
        text, params["patch"], params["cls"], params["prompt"], (32, 32), "interleave")
    np.testing.assert_allclose(out["M"], m_ref, atol=1e-5, rtol=0)


def test_save_and_load_model_directory(tmp_path, rng):
    model = tiny_model("stack", image_score="max")
    model.adapters.cls.set_value(model.adapters.cls[...] * 3)
    model_dir.save(model, tmp_path / "m")
    loaded = model_dir.load(tmp_path / "m")
    assert loaded.config == model.config
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    for a, b in zip(model.predict(images, "wood"), loaded.predict(images, "wood"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert checkpoint_io.read(tmp_path / "m" / "backbone", "dinov3")[1]["variant"] == "tiny"
    with pytest.raises(checkpoint_io.CheckpointError, match="missing"):
        adapter_conv.official_to_params({"cls_token_adapter": {}}, source="bad.pth")


def test_model_dir_records_the_trained_text_activation(tmp_path):
    """A tower whose metadata says QuickGELU, trained with exact GELU: eval and predict must run
    it with GELU again (model.json records it), unless told otherwise."""
    backbone = dinov3.create("tiny", rngs=nnx.Rngs(0))
    text = clip_text.create("tiny", activation="quick_gelu", rngs=nnx.Rngs(1))
    model_dir.save(ad.ADDinoV3(text_tower=text, backbone=backbone, config=ad.HeadConfig(
        feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2)), tmp_path / "towers")
    model = ad.ADDinoV3(backbone, text, ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    model_dir.save(model, tmp_path / "model", text_tower=str(tmp_path / "towers" / "text_tower"),
                   text_activation="gelu")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["text_activation"] == "gelu"
    assert model_dir.load(tmp_path / "model").text_tower.config.activation == "gelu"
    assert model_dir.load(tmp_path / "model", text_activation="quick_gelu").text_tower.config.activation \
        == "quick_gelu"
    assert towers.load_clip_text(str(tmp_path / "towers" / "text_tower")).config.activation == "quick_gelu"
