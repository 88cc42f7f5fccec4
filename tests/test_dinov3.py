"""DINOv3 backbone: parity with transformers `DINOv3ViTModel`, the official `.pth` path,
full-size shapes, get_intermediate_layers semantics, RoPE and bad checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from addinov3_jax.commands import parity
from addinov3_jax.io import checkpoint_io, towers
from addinov3_jax.io.checkpoint_io import CheckpointError
from addinov3_jax.models import dinov3
from weight_conversion import dinov3 as conv

CONFIGS = {
    "mlp": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4),
    "swiglu": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=2, use_gated_mlp=True, hidden_act="silu"),
    # 7B-like: head_dim 128, no q/v bias, SwiGLU hidden aligned to 64.
    "7b_like": dict(hidden_size=256, intermediate_size=dinov3.swiglu_hidden(256, 3, 64),
                    num_hidden_layers=2, num_attention_heads=2, use_gated_mlp=True,
                    hidden_act="silu", query_bias=False, value_bias=False),
}


def hf_model(name, seed=0):
    cfg = DINOv3ViTConfig(num_register_tokens=4, **CONFIGS[name])
    model = DINOv3ViTModel(cfg).eval()
    parity.randomize_torch(model, seed)
    return model


def reference(model, x_bhwc):
    with torch.no_grad():
        out = model(torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
        hidden = [model.norm(h).numpy() for h in out.hidden_states[1:]]
    return out.last_hidden_state.numpy(), out.hidden_states[-1].numpy(), hidden


def assert_matches(model, ref_model, x, atol=1e-5):
    last, prenorm, hidden = reference(ref_model, x)
    # Jitted calls (eagerly, every call would compile the layer scan again); same numbers.
    out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(out["x_norm_clstoken"], last[:, 0], atol=atol, rtol=0)
    np.testing.assert_allclose(out["x_storage_tokens"], last[:, 1:5], atol=atol, rtol=0)
    np.testing.assert_allclose(out["x_norm_patchtokens"], last[:, 5:], atol=atol, rtol=0)
    np.testing.assert_allclose(out["x_prenorm"], prenorm, atol=atol * max(1, np.abs(prenorm).max()),
                               rtol=0)
    layers = nnx.jit(lambda m, x: m.get_intermediate_layers(
        x, n=len(hidden), return_class_token=True, return_extra_tokens=True))(model, x)
    for (patches, cls, extra), ref in zip(layers, hidden, strict=True):
        np.testing.assert_allclose(cls, ref[:, 0], atol=atol, rtol=0)
        np.testing.assert_allclose(extra, ref[:, 1:5], atol=atol, rtol=0)
        np.testing.assert_allclose(patches, ref[:, 5:], atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (70, 90)])
def test_matches_transformers(tmp_path, name, size):
    ref = hf_model(name)
    # LayerNorms, biases and LayerScale are randomised, not left at their init values.
    assert not torch.allclose(ref.model.layer[0].layer_scale1.lambda1, torch.ones(1))
    assert not torch.allclose(ref.norm.weight, torch.ones(1))
    ref.save_pretrained(tmp_path)
    model = towers.load_dinov3(tmp_path, rope_periods="exact", scan_layers=name != "mlp")
    x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    assert_matches(model, ref, x)


def official_state_dict(ref: DINOv3ViTModel, rng) -> dict[str, torch.Tensor]:
    """An official-format state dict written from the reference key table (dinov3.md §4.1)."""
    hf = ref.state_dict()
    d = ref.config.hidden_size
    sd = {"cls_token": hf["embeddings.cls_token"],
          "storage_tokens": hf["embeddings.register_tokens"],
          "mask_token": hf["embeddings.mask_token"].reshape(1, d),
          "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
          "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
          "rope_embed.periods": torch.from_numpy(
              dinov3.exact_periods(d // ref.config.num_attention_heads)).to(torch.bfloat16)}
    for i in range(ref.config.num_hidden_layers):
        p = f"model.layer.{i}." if f"model.layer.{i}.norm1.weight" in hf else f"layer.{i}."
        o = f"blocks.{i}."
        sd[o + "norm1.weight"], sd[o + "norm1.bias"] = hf[p + "norm1.weight"], hf[p + "norm1.bias"]
        sd[o + "attn.qkv.weight"] = torch.cat([hf[p + f"attention.{n}_proj.weight"] for n in "qkv"])
        k_bias = torch.from_numpy(rng.standard_normal(d).astype(np.float32))  # must be ignored
        sd[o + "attn.qkv.bias"] = torch.cat([hf[p + "attention.q_proj.bias"], k_bias,
                                             hf[p + "attention.v_proj.bias"]])
        sd[o + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        sd[o + "attn.proj.weight"] = hf[p + "attention.o_proj.weight"]
        sd[o + "attn.proj.bias"] = hf[p + "attention.o_proj.bias"]
        sd[o + "ls1.gamma"] = hf[p + "layer_scale1.lambda1"]
        sd[o + "norm2.weight"], sd[o + "norm2.bias"] = hf[p + "norm2.weight"], hf[p + "norm2.bias"]
        sd[o + "mlp.fc1.weight"], sd[o + "mlp.fc1.bias"] = (hf[p + "mlp.up_proj.weight"],
                                                             hf[p + "mlp.up_proj.bias"])
        sd[o + "mlp.fc2.weight"], sd[o + "mlp.fc2.bias"] = (hf[p + "mlp.down_proj.weight"],
                                                             hf[p + "mlp.down_proj.bias"])
        sd[o + "ls2.gamma"] = hf[p + "layer_scale2.lambda1"]
    sd["norm.weight"], sd["norm.bias"] = hf["norm.weight"], hf["norm.bias"]
    sd["local_cls_norm.weight"] = torch.randn(d)
    sd["local_cls_norm.bias"] = torch.randn(d)
    return sd


def test_official_pth_path(tmp_path, rng):
    ref = hf_model("mlp", seed=3)
    sd = official_state_dict(ref, rng)
    pth = tmp_path / "dinov3_custom_pretrain_lvd1689m-00000000.pth"
    torch.save(sd, pth)
    from addinov3_jax.commands.cli import main

    assert main(["convert", "dinov3", "--source", str(pth), "--output", str(tmp_path / "conv")]) == 0
    meta = checkpoint_io.read(tmp_path / "conv", "dinov3")[1]
    assert meta["source_format"] == "official"
    assert meta["rope_periods_source"] == "checkpoint (bf16-rounded, as released)"
    assert meta["config"]["local_cls_norm"] is True
    model = towers.load_dinov3(tmp_path / "conv")
    periods = np.asarray(model.rope_periods[...])
    np.testing.assert_array_equal(periods, sd["rope_embed.periods"].float().numpy())
    assert not np.array_equal(periods, dinov3.exact_periods(16))
    # The reference forward with the same (bf16-rounded) periods.
    ref.rope_embeddings.inv_freq.copy_(torch.from_numpy(1.0 / periods))
    x = rng.standard_normal((2, 48, 80, 3)).astype(np.float32)
    assert_matches(model, ref, x)
    # Loading the .pth directly gives the same model.
    direct = towers.load_dinov3(pth)
    np.testing.assert_array_equal(direct(x)["x_prenorm"], model(x)["x_prenorm"])


def test_round_trip_official_and_hf(rng):
    cfg = dinov3.get_config("tiny")
    model = dinov3.create(cfg, rngs=nnx.Rngs(0))
    params = checkpoint_io.flat_params(model)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    params["blocks.attn.qkv.bias"][:, 1] = 0  # the key bias never survives conversion
    official = conv.params_to_official(params, cfg)
    back = conv.official_to_params(official, cfg)
    via_hf = conv.hf_to_official(conv.official_to_hf(official))
    via_hf["rope_embed.periods"] = official["rope_embed.periods"]
    back_hf = conv.official_to_params(via_hf, cfg)
    for k, v in params.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
        np.testing.assert_array_equal(back_hf[k], v, err_msg=k)


EXPECTED_PARAMS = {
    "vits16": 21_601_152, "vits16plus": 28_697_472, "vitb16": 85_669_632,
    "vitl16": 303_154_176, "vitl16_sat493m": 303_156_224, "vitl16plus": 403_915_776,
    "vith16plus": 840_633_600, "vit7b16": 6_716_043_264, "vit7b16_sat493m": 6_716_043_264,
}


@pytest.mark.parametrize("variant", list(EXPECTED_PARAMS))
def test_full_size_param_counts(variant):
    model = nnx.eval_shape(lambda: dinov3.create(variant, rngs=nnx.Rngs(0)))
    assert dinov3.count_params(model) == EXPECTED_PARAMS[variant]
    cfg = dinov3.get_config(variant)
    n_keys = len(conv.official_shapes(cfg))
    assert n_keys == {"vitl16_sat493m": 370, "vit7b16": 610, "vit7b16_sat493m": 610,
                      "vitl16": 368, "vitl16plus": 416, "vith16plus": 552}.get(
        variant, 188 if "plus" not in variant else 212)
    x = jnp.zeros((1, 512, 512, 3))
    out = nnx.eval_shape(lambda m: m.get_intermediate_layers(x, n=(0, 3), reshape=True), model)
    assert out[0].shape == (1, 32, 32, cfg.embed_dim)


def test_intermediate_layer_semantics():
    model = dinov3.create("tiny", rngs=nnx.Rngs(0), scan_layers=False)
    x = np.random.default_rng(0).standard_normal((1, 70, 90, 3)).astype(np.float32)
    a = model.get_intermediate_layers(x, n=(3, 1))
    b = model.get_intermediate_layers(x, n=2, norm=False)
    assert len(a) == 2 and a[0].shape == (1, 20, 64)  # 70x90 -> 4x5 grid, floored
    np.testing.assert_allclose(a[0], model.get_intermediate_layers(x, n=[1])[0], atol=1e-6)
    np.testing.assert_allclose(b[1], model(x)["x_prenorm"][:, 5:], atol=1e-6)
    grid = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
    assert grid[0][0].shape == (1, 4, 5, 64) and grid[0][1].shape == (1, 64)
    for bad in ([1, 1], [4], [-1], 0, 5):
        with pytest.raises(ValueError):
            model.get_intermediate_layers(x, n=bad)


def test_scan_equals_unrolled():
    x = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
    scanned = dinov3.create("tiny", rngs=nnx.Rngs(0), scan_layers=True)
    unrolled = dinov3.create("tiny", rngs=nnx.Rngs(0), scan_layers=False)
    np.testing.assert_allclose(scanned(x)["x_prenorm"], unrolled(x)["x_prenorm"], atol=1e-6)


def test_random_init_eagerly_equals_one_block_at_a_time_under_jit():
    # `layers.per_layer`: eagerly a vmap over the per-layer keys, under a trace a lax.map (one
    # block of temporaries); the same numbers either way, so a model is the same model however
    # it was built (the runtime builds it under `jax.jit`).
    eager = nnx.state(dinov3.create("tiny", rngs=nnx.Rngs(3)))
    traced = jax.jit(lambda: nnx.state(dinov3.create("tiny", rngs=nnx.Rngs(3))))()
    flat_e, flat_t = dict(nnx.to_flat_state(eager)), dict(nnx.to_flat_state(traced))
    assert flat_e.keys() == flat_t.keys() and any(k[0] == "blocks" for k in flat_e)
    for k in flat_e:
        np.testing.assert_array_equal(flat_e[k].get_value(), flat_t[k].get_value(), err_msg=str(k))


def test_rope_reference_vector():
    # shared/reference/dinov3.md §2.3: d = 8, periods [1, 10], grid 2 x 3, v = 0..7.
    sin, cos = dinov3.rope_tables(dinov3.rope_coords(2, 3), jnp.array([1.0, 10.0]))
    v = jnp.broadcast_to(jnp.arange(8.0), (1, 6, 1, 8))
    out = np.asarray(dinov3.apply_rope(v, sin, cos))[0, :, 0]
    np.testing.assert_allclose(
        out[0], [0, 2.49614, -6.19615, 5.58779, -4, 4.44627, -1.26795, 5.17461], atol=2e-5)
    np.testing.assert_allclose(
        out[5], [0, -0.59403, 4.19615, -0.10652, -4, 5.06430, -4.73205, 7.61503], atol=2e-5)


def test_periods_tables():
    np.testing.assert_array_equal(
        dinov3.bf16_periods(64),
        [1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5, 10.0, 13.3125, 17.75,
         23.75, 31.625, 42.25, 56.25, 75.0])
    assert dinov3.swiglu_hidden(1024, 6, 8) == 4096 and dinov3.swiglu_hidden(4096, 3, 64) == 8192


def test_rope_augmentation_only_when_asked():
    model = dinov3.create("tiny", rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    plain = model(x)["x_prenorm"]
    np.testing.assert_array_equal(plain, model(x)["x_prenorm"])
    import jax

    augmented = model(x, rope_rng=jax.random.key(1))["x_prenorm"]
    assert np.abs(np.asarray(augmented) - np.asarray(plain)).max() > 0


def test_bad_checkpoints(tmp_path, rng):
    ref = hf_model("mlp")
    sd = official_state_dict(ref, rng)
    pth = tmp_path / "good.pth"
    torch.save(sd, pth)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        conv.convert_source(truncated)
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\)"):
        conv.convert_source(pth, variant="vits16")
    del sd["blocks.1.attn.proj.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): blocks.1.attn.proj.weight"):
        conv.convert_source(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        towers.load_dinov3(tmp_path / "nope.pth")
    # A converted directory whose weights were modified is refused by checksum.
    conv.convert(pth, tmp_path / "conv")
    with open(tmp_path / "conv" / checkpoint_io.PARAMS_FILE, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        towers.load_dinov3(tmp_path / "conv")


def test_parity_cli_random(capsys):
    from addinov3_jax.commands.cli import main

    assert main(["parity", "dinov3", "--random", "tiny", "--image-size", "48,64"]) == 0
    out = capsys.readouterr().out
    assert "block 3 (normed)" in out and "PASS" in out


def test_parity_cli_source(tmp_path, rng, capsys):
    from addinov3_jax.commands.cli import main

    torch.save(official_state_dict(hf_model("mlp", seed=5), rng), tmp_path / "official.pth")
    assert main(["parity", "dinov3", "--source", str(tmp_path / "official.pth"),
                 "--image-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "block 2 (normed)" in out and "PASS" in out
