"""The official pipeline's per-image structure in PyTorch (random weights, same sizes):
one image at a time through the backbone, and the 420-sentence prompt ensemble re-encoded at the
full 77-token context for every image."""

import time

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, DINOv3ViTConfig, DINOv3ViTModel

from addinov3_jax.models import clip_text, dinov3, prompts
from addinov3_jax.models.tokenizer import tokenize
from weight_conversion import clip_text as clip_conv
from weight_conversion import dinov3 as dino_conv


def per_image_seconds(size=512, backbone="vitl16", text="vitl14_336", reps=1):
    """(backbone seconds, prompt-ensemble seconds) for one image, PyTorch CPU, median of reps."""
    bb = DINOv3ViTModel(DINOv3ViTConfig(**dino_conv.hf_config(dinov3.get_config(backbone)))).eval()
    tt = CLIPTextModelWithProjection(CLIPTextConfig(
        **clip_conv.hf_config(clip_text.get_config(text, "gelu")))).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
    ids = torch.from_numpy(tokenize(prompts.sentences("bottle"))).long()
    t_bb, t_tx = [], []
    with torch.inference_mode():
        bb(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            bb(x, output_hidden_states=True)
            t_bb.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tt(ids)
            t_tx.append(time.perf_counter() - t0)
    return float(np.median(t_bb)), float(np.median(t_tx))
