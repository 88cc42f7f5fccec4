"""CLIP text tower: parity with transformers `CLIPTextModelWithProjection` (both activations),
the OpenAI / OpenCLIP / HF conversion paths, the prompt ensemble and its cache."""

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from addinov3_jax.commands import parity
from addinov3_jax.io import checkpoint_io, text_cache, towers
from addinov3_jax.io.checkpoint_io import CheckpointError
from addinov3_jax.models import clip_text, prompts
from addinov3_jax.models.tokenizer import tokenize
from weight_conversion import clip_text as conv

# 2-layer tower at the full ViT-L/14 width.
WIDE = clip_text.Config(width=768, depth=2, num_heads=12, embed_dim=768)
SENTENCES = ["a bad photo of a bottle.", "a photo of a flawless metal_nut.",
             "there is the damaged pipe_fryum in the scene.", "01"]


def hf_reference(cfg, activation, seed=0):
    cfg = clip_text.Config(**{**cfg.to_dict(), "activation": activation})
    model = CLIPTextModelWithProjection(CLIPTextConfig(**conv.hf_config(cfg))).eval()
    parity.randomize_torch(model, seed)
    return model


def run_reference(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long())
    pooled = out.last_hidden_state.numpy()[np.arange(len(ids)), ids.argmax(-1)]
    return pooled, out.text_embeds.numpy()


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("cfg", [clip_text.get_config("tiny"), WIDE], ids=["tiny", "wide"])
def test_matches_transformers(tmp_path, cfg, activation):
    ref = hf_reference(cfg, activation)
    ref.save_pretrained(tmp_path)
    model = towers.load_clip_text(tmp_path)
    assert model.config.activation == activation  # taken from the HF config
    ids = tokenize(SENTENCES)
    pooled, projected = run_reference(ref, ids)
    out = model(ids)
    np.testing.assert_allclose(out["pooled"], pooled, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["projected"], projected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["embeddings"],
                               projected / np.linalg.norm(projected, axis=-1, keepdims=True),
                               atol=1e-6)
    # The activation matters (so the switch is real) and can be overridden at load time.
    other = towers.load_clip_text(tmp_path, activation="gelu" if activation == "quick_gelu" else "quick_gelu")
    assert np.abs(np.asarray(other(ids)["projected"]) - projected).max() > 1e-4


def openai_state_dict(ref):
    """OpenAI-format dict written from the reference key table, Linear tensors stored in fp16."""
    hf = ref.state_dict()
    n = ref.config.num_hidden_layers
    sd = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          "ln_final.bias": hf["text_model.final_layer_norm.bias"],
          "text_projection": hf["text_projection.weight"].T.half(),
          "logit_scale": torch.tensor(4.6052), "visual.proj": torch.randn(4, 4),
          "visual.conv1.weight": torch.randn(8, 3, 2, 2)}
    for i in range(n):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[o + f"attn.in_proj_{kind}"] = torch.cat(
                [hf[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]).half()
            sd[o + f"attn.out_proj.{kind}"] = hf[h + f"self_attn.out_proj.{kind}"].half()
            sd[o + f"ln_1.{kind}"] = hf[h + f"layer_norm1.{kind}"]
            sd[o + f"ln_2.{kind}"] = hf[h + f"layer_norm2.{kind}"]
            sd[o + f"mlp.c_fc.{kind}"] = hf[h + f"mlp.fc1.{kind}"].half()
            sd[o + f"mlp.c_proj.{kind}"] = hf[h + f"mlp.fc2.{kind}"].half()
    return sd


def fp16_rounded_reference(ref, sd):
    """The reference with exactly the fp16-rounded weights of `sd` (upcast is exact)."""
    back = conv.openai_to_hf(conv.text_keys_openai({k: v.float().numpy() for k, v in sd.items()}))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    return ref


@pytest.mark.parametrize("layout", ["openai", "openclip_custom", "openclip_safetensors"])
def test_openai_and_openclip_formats(tmp_path, layout):
    ref = hf_reference(clip_text.get_config("tiny"), "quick_gelu", seed=1)
    sd = openai_state_dict(ref)
    ref = fp16_rounded_reference(ref, sd)
    if layout == "openai":
        path = tmp_path / "ViT-tiny.pt"
        torch.save({**sd, "context_length": torch.tensor(77)}, path)
    elif layout == "openclip_custom":  # CustomTextCLIP: `text.` prefix, wrapped, DDP prefix
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.text.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    meta = conv.convert(path, tmp_path / "conv", activation="quick_gelu")
    assert meta["source_format"] == ("openclip-custom" if layout == "openclip_custom" else "openai")
    assert meta["tokenizer_files"] == ["bpe_simple_vocab_16e6.txt.gz"]
    model = towers.load_clip_text(tmp_path / "conv")
    ids = clip_text.load_tokenizer(tmp_path / "conv")(SENTENCES)
    pooled, projected = run_reference(ref, ids)
    np.testing.assert_allclose(model(ids)["projected"], projected, atol=1e-5, rtol=0)
    # OpenAI-format weights default to exact GELU, as AD-DINOv3 runs them.
    assert conv.convert_source(path)[0].activation == "gelu"


def test_hf_clipmodel_safetensors_ignores_vision(tmp_path):
    ref = hf_reference(clip_text.get_config("tiny"), "quick_gelu", seed=2)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["vision_model.embeddings.class_embedding"] = torch.randn(16)
    sd["visual_projection.weight"] = torch.randn(8, 16)
    sd["logit_scale"] = torch.tensor(1.0)
    save_file(sd, tmp_path / "model.safetensors")
    model = towers.load_clip_text(tmp_path / "model.safetensors", activation="quick_gelu")
    ids = tokenize(SENTENCES)
    np.testing.assert_allclose(model(ids)["projected"], run_reference(ref, ids)[1], atol=1e-5, rtol=0)


def test_round_trip_and_bad_checkpoints(tmp_path, rng):
    cfg = clip_text.get_config("tiny")
    model = clip_text.create(cfg, rngs=nnx.Rngs(0))
    params = {k: rng.standard_normal(v.shape).astype(np.float32)
              for k, v in checkpoint_io.flat_params(model).items()}
    sd = conv.params_to_openai(params, cfg)
    for k, v in conv.openai_to_params(conv.hf_to_openai(conv.openai_to_hf(sd)), cfg, source="x").items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
              tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): transformer.resblocks.1.mlp.c_fc.bias"):
        towers.load_clip_text(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped"):
        conv.convert_source(tmp_path / "broken.safetensors", variant="vitb16")


def test_full_size_param_count():
    model = nnx.eval_shape(lambda: clip_text.create("vitl14_336", rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 123_650_304


def test_prompt_ensemble_equals_per_sentence_loop(tmp_path):
    ref = hf_reference(clip_text.get_config("tiny"), "gelu", seed=4)
    ref.save_pretrained(tmp_path / "hf")
    model = towers.load_clip_text(tmp_path / "hf")
    words = ["bottle", "metal_nut", "Data"]
    ours = prompts.text_features(model, words)
    assert ours.shape == (3, 64, 2)
    for w, feats in zip(words, ours, strict=True):
        sentences = prompts.sentences(w)
        assert len(sentences) == 420 and sentences[0] == f"a bad photo of a {w}."
        groups = []
        for group in (sentences[:245], sentences[245:]):
            # Every sentence on its own row at the full 77-token context (rows never interact).
            _, e = run_reference(ref, tokenize(group))
            rows = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
            rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
            mean = np.mean(rows, axis=0)
            groups.append(mean / np.linalg.norm(mean))
        np.testing.assert_allclose(feats, np.stack(groups, -1), atol=1e-6)
    full = prompts.text_features(model, words, full_context=True)
    np.testing.assert_allclose(full, ours, atol=1e-6)


def test_prompt_cache(tmp_path, monkeypatch):
    ref = hf_reference(clip_text.get_config("tiny"), "gelu", seed=5)
    ref.save_pretrained(tmp_path / "hf")
    conv.convert(tmp_path / "hf", tmp_path / "conv")
    model = towers.load_clip_text(tmp_path / "conv")
    first = text_cache.text_features(model, ["screw", "wood", "screw"], cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first[0], first[2])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    def boom(*a, **k):
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(prompts, "_encode_classes", boom)
    again = text_cache.text_features(model, ["wood", "screw"], cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, first[[1, 0]])
    other = towers.load_clip_text(tmp_path / "conv", activation="quick_gelu")  # a different key
    with pytest.raises(AssertionError, match="encoder ran"):
        text_cache.text_features(other, ["wood"], cache_dir=tmp_path / "cache")


def test_parity_cli(capsys, tmp_path):
    from addinov3_jax.commands.cli import main

    assert main(["parity", "clip-text", "--random", "tiny", "--activation", "gelu"]) == 0
    assert "projected" in capsys.readouterr().out
    ref = hf_reference(clip_text.get_config("tiny"), "quick_gelu", seed=6)
    ref.save_pretrained(tmp_path)
    assert main(["convert", "clip-text", "--source", str(tmp_path), "--output",
                 str(tmp_path / "conv")]) == 0
    assert main(["parity", "clip-text", "--source", str(tmp_path / "conv")]) == 0
