"""`addinov3 parity`: per-layer error tables of our towers against the transformers references.

Needs the `test` extra (torch + transformers: `pip install -c requirements/constraints.txt -e
'.[test]'` from the repository root); the package itself never imports torch elsewhere.
The reference and our fp32 run use fp32 with `jax.default_matmul_precision("highest")`. With
`dtype="bfloat16"` our tower also runs with `compute_dtype=bfloat16` (same weights) and two more
tables compare it with the transformers fp32 reference and with our own fp32 outputs; those rows
pass on the relative L2 error `||ours - ref|| / ||ref||`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

DEFAULT_ATOL = {"dinov3": 1e-4, "clip-text": 1e-4}
# bf16 rows: relative L2 error per output (bf16 keeps 8 bits of mantissa: 2^-9 = 2e-3 per rounding;
# errors compound over the blocks).
DEFAULT_BF16_RTOL = 5e-2
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float
    rel_l2: float = 0.0


def compare(name: str, ours, ref) -> Row:
    a = np.asarray(ours, np.float64).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape mismatch, ours {np.shape(ours)} vs reference {np.shape(ref)}")
    diff = np.abs(a - b)
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    rel_l2 = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    return Row(name, float(diff.max()), float((diff / np.maximum(np.abs(b), 1e-6)).max()), cos,
               float(np.abs(b).max()), rel_l2)


def _rows(names, ours, refs) -> list[Row]:
    return [compare(n, a, b) for n, a, b in zip(names, ours, refs, strict=True)]


def print_table(title: str, rows: list[Row], atol: float | None = None, *,
                rel_l2: float | None = None) -> bool:
    """Prints the table; a row passes when max_abs <= atol * max(1, max|ref|) (fp32), or when
    its relative L2 error is <= rel_l2 (bf16)."""
    print(title)
    print(f"{'output':<22}{'max abs':>12}{'max rel':>12}{'rel L2':>12}{'cosine':>14}"
          f"{'max |ref|':>12}  ok")
    ok = True
    for r in rows:
        good = r.rel_l2 <= rel_l2 if rel_l2 is not None else r.max_abs <= atol * max(1.0, r.ref_max)
        ok &= good
        print(f"{r.name:<22}{r.max_abs:>12.3e}{r.max_rel:>12.3e}{r.rel_l2:>12.3e}{r.cosine:>14.9f}"
              f"{r.ref_max:>12.4g}  {'yes' if good else 'NO'}")
    rule = (f"relative L2 <= {rel_l2:g}" if rel_l2 is not None
            else f"max abs <= {atol:g} x max(1, max|ref|)")
    print(f"tolerance: {rule}: {'PASS' if ok else 'FAIL'}")
    return ok


def _bf16_tables(title: str, ours_bf16: list[Row], ours_vs_ours: list[Row], rtol: float | None
                 ) -> bool:
    rtol = rtol or DEFAULT_BF16_RTOL
    ok = print_table(f"{title}: ours bfloat16 vs the reference fp32", ours_bf16, rel_l2=rtol)
    return print_table(f"{title}: ours bfloat16 vs ours fp32", ours_vs_ours, rel_l2=rtol) and ok


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _as_bfloat16(model):
    """A copy of a tower computing in bf16 (parameters unchanged, fp32)."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.clone(model)
    model.compute_dtype = jnp.dtype(jnp.bfloat16)
    return model


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(
            "addinov3 parity: error: needs torch and transformers; from the repository root: "
            "pip install -c requirements/constraints.txt -e '.[test]'"
        ) from e
    return torch, transformers


def randomize_torch(module, seed: int) -> None:
    """Gives every parameter a random non-trivial value (norms around 1, LayerScale around 0.5)."""
    torch, _ = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "lambda1" in name or name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embedding" in name or "token" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))


def load_exactly(module, state: dict[str, np.ndarray]) -> None:
    """Loads on-disk-named HF weights into a transformers module, refusing any missing or
    unexpected key (transformers 5 keeps DINOv3 layers under `model.` in memory)."""
    torch, _ = _torch()
    own = set(module.state_dict())
    renamed = {}
    for k, v in state.items():
        if k not in own and f"model.{k}" in own:
            k = f"model.{k}"
        renamed[k] = torch.from_numpy(np.array(v))
    missing = sorted(own - set(renamed) - {k for k in own if k.endswith("position_ids")})
    unexpected = sorted(set(renamed) - own)
    if missing or unexpected:
        raise ValueError(f"reference model keys do not match: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    module.load_state_dict(renamed, strict=False)


def _state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def dinov3(*, source=None, random_variant=None, image_size=(224, 224), seed=0, batch=2,
           atol=None, dtype="float32", bf16_rtol=None) -> bool:
    """Compares our DINOv3 with transformers' `DINOv3ViTModel` on one random batch (and, with
    `dtype="bfloat16"`, our bf16 forward with the reference and with our fp32 forward)."""
    _check_dtype(dtype)
    torch, transformers = _torch()
    from addinov3_jax.io import checkpoint_io, towers
    from addinov3_jax.models import dinov3 as d3
    from weight_conversion import dinov3 as conv

    if source is not None:
        model = towers.load_dinov3(source)
        cfg = model.config
        sd = conv.params_to_official(checkpoint_io.flat_params(model), cfg)
        title = f"DINOv3 parity: {source}"
    else:
        cfg = d3.get_config(random_variant)
        title = f"DINOv3 parity: random {random_variant}"
        sd = None
    ref = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**conv.hf_config(cfg))).eval()
    if sd is None:
        randomize_torch(ref, seed)
        sd = conv.hf_to_official(_state_dict_numpy(ref))
        sd["rope_embed.periods"] = d3.exact_periods(cfg.head_dim, cfg.rope_base)
        model = d3.create(cfg, rngs=__import__("flax").nnx.Rngs(seed))
        checkpoint_io.assign(model, conv.official_to_params(sd, cfg), source="random")
    else:
        load_exactly(ref, conv.official_to_hf(sd))
    # Use the same periods on both sides (the official ones when the checkpoint stores them).
    periods = np.asarray(model.rope_periods[...], np.float32)
    ref.rope_embeddings.inv_freq.copy_(torch.from_numpy(1.0 / periods))

    h, w = image_size
    x = np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
        hidden = [ref.norm(t).numpy() for t in out.hidden_states[1:]]
    r = 1 + cfg.num_registers
    last = out.last_hidden_state.numpy()
    reference = [last[:, 0], last[:, 1:r], last[:, r:], out.hidden_states[-1].numpy(), *hidden]

    def outputs(m):
        with jax.default_matmul_precision("highest"):
            ours = m(x)
            inter = m.get_intermediate_layers(x, n=cfg.depth, return_class_token=True,
                                              return_extra_tokens=True)
        got = [ours["x_norm_clstoken"], ours["x_storage_tokens"], ours["x_norm_patchtokens"],
               ours["x_prenorm"]]
        for patches, cls, extra in inter:
            got.append(np.concatenate([np.asarray(cls, np.float32)[:, None],
                                       np.asarray(extra, np.float32),
                                       np.asarray(patches, np.float32)], 1))
        return [np.asarray(g, np.float32) for g in got]

    names = ["cls", "registers", "patches", "prenorm",
             *(f"block {i} (normed)" for i in range(cfg.depth))]
    return _compare(f"{title}, input {batch}x{h}x{w}", names, outputs, model, reference,
                    atol or DEFAULT_ATOL["dinov3"], dtype, bf16_rtol)


def clip_text(*, source=None, random_variant=None, activation="quick_gelu", seed=0,
              atol=None, dtype="float32", bf16_rtol=None) -> bool:
    """Compares our text tower with transformers' `CLIPTextModelWithProjection` (and, with
    `dtype="bfloat16"`, our bf16 forward with the reference and with our fp32 forward)."""
    _check_dtype(dtype)
    torch, transformers = _torch()
    from flax import nnx

    from addinov3_jax.io import checkpoint_io, towers
    from addinov3_jax.models import clip_text as ct
    from addinov3_jax.models import prompts, tokenizer
    from weight_conversion import clip_text as conv

    if source is not None:
        model = towers.load_clip_text(source)
        cfg = model.config
        title = f"CLIP text parity: {source} ({cfg.activation})"
    else:
        cfg = ct.get_config(random_variant, activation)
        title = f"CLIP text parity: random {random_variant} ({activation})"
    ref = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**conv.hf_config(cfg))).eval()
    if source is None:
        randomize_torch(ref, seed)
        sd = conv.hf_to_openai(_state_dict_numpy(ref))
        model = ct.create(cfg, rngs=nnx.Rngs(seed))
        checkpoint_io.assign(model, conv.openai_to_params(sd, cfg, source="random"), source="random")
    else:
        sd = conv.params_to_openai(checkpoint_io.flat_params(model), cfg)
        load_exactly(ref, conv.openai_to_hf(sd))
    try:
        tok = ct.load_tokenizer(source)
        ids = tok(prompts.sentences("bottle")[::60] + ["a photo of a flawless metal_nut."])
    except tokenizer.TokenizerError:  # no vocabulary: random ids with an EOT
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, 49000, (8, 77)).astype(np.int32)
        ids[:, 10] = tokenizer.EOT_ID
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    eot = ids.argmax(-1)
    reference = [*(out.hidden_states[i + 1].numpy() for i in range(cfg.depth)),
                 out.last_hidden_state.numpy()[np.arange(len(ids)), eot], out.text_embeds.numpy()]
    names = [*(f"block {i}" for i in range(cfg.depth)), "pooled", "projected"]

    def outputs(m):
        with jax.default_matmul_precision("highest"):
            o = m(ids, return_hidden=True)
        return [np.asarray(g, np.float32) for g in (*o["hidden"], o["pooled"], o["projected"])]

    return _compare(title, names, outputs, model, reference, atol or DEFAULT_ATOL["clip-text"],
                    dtype, bf16_rtol)


def _compare(title, names, outputs, model, reference, atol, dtype, bf16_rtol) -> bool:
    """The fp32 table of `outputs(model)` against `reference`; with bf16, the two bf16 tables
    (against the reference and against our fp32). True when every table passes."""
    ours = outputs(model)
    ok = print_table(title, _rows(names, ours, reference), atol)
    if dtype == "bfloat16":
        low = outputs(_as_bfloat16(model))
        ok = _bf16_tables(title, _rows(names, low, reference), _rows(names, low, ours),
                          bf16_rtol) and ok
    return ok
