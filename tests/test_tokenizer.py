"""CLIP tokenizer: identical ids to transformers' CLIPTokenizer on every ensemble sentence and edge
cases, the reference ids, padding / truncation rules, and HF-file round trip."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from addinov3_jax.models import prompts
from addinov3_jax.models.tokenizer import (
    EOT_ID,
    SOT_ID,
    Tokenizer,
    TokenizerError,
    default_tokenizer,
    tokenize,
)

# The 34 object words of shared/reference/clip_text.md §3.3 (12 states x 35 templates x 34 = 14,280).
WORDS = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
         "screw", "tile", "toothbrush", "transistor", "wood", "zipper", "Data", "01", "02", "03",
         "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
         "pcb2", "pcb3", "pcb4", "pipe_fryum", "bracket_black", "metal_plate", "tubes"]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    default_tokenizer().save_hf_files(d)
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


def test_all_ensemble_sentences_match_transformers(hf_tokenizer):
    sentences = [s for w in WORDS for s in prompts.sentences(w)]
    assert len(sentences) == 14_280
    ours = tokenize(sentences)
    ref = hf_tokenizer(sentences, padding="max_length", max_length=77)["input_ids"]
    for row, (a, b) in enumerate(zip(ours, ref, strict=True)):
        n = int((a != 0).sum())
        assert list(a[:n]) == b[:n], sentences[row]
        assert not a[n:].any()


@pytest.mark.parametrize("text", [
    "Café naïve Ünïcödé 日本語 🙂", "digits 0123456789 and 3.14159", "punctuation!!! ??? ...,,;;--",
    "it's we'll they're I'd you've", "tabs\tand\nnewlines   and  spaces", "UPPER lower MiXeD",
    "snake_case kebab-case CamelCase", "<html> tags </html> & ampersand", "x" * 60,
])
def test_edge_cases_match_transformers(hf_tokenizer, text):
    assert hf_tokenizer(text)["input_ids"] == [SOT_ID, *default_tokenizer().encode(text), EOT_ID]


def test_reference_ids():
    from addinov3_jax.models import clip_text

    assert clip_text.tokenize is tokenize  # the documented public name
    assert tokenize("a bad photo of a bottle.")[0, :9].tolist() == [
        49406, 320, 2103, 1125, 539, 320, 5392, 269, 49407]
    assert tokenize("a photo of a flawless metal_nut.")[0, :11].tolist() == [
        49406, 320, 1125, 539, 320, 15531, 4044, 318, 6491, 269, 49407]
    enc = default_tokenizer().encode
    expected = {"hazelnut": [35816], "metal_nut": [4044, 318, 6491], "transistor": [32236, 17740],
                "Data": [2281], "01": [271, 272], "candle": [12674],
                "pipe_fryum": [10459, 318, 936, 7259], "toothbrush": [36841]}
    for word, ids in expected.items():
        assert enc(word) == ids, word


def test_cleaning_ftfy_and_html():
    enc = default_tokenizer().encode
    assert enc("&amp;amp;") == enc("&")  # unescaped twice
    assert enc("ﬁsh") == enc("fish")  # ftfy fixes ligatures
    assert enc("  A   Photo ") == enc("a photo")


def test_padding_and_limits():
    ids = tokenize(["a", "a photo"], context_length=10)
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    assert ids[0].tolist() == [SOT_ID, 320, EOT_ID] + [0] * 7
    long = "word " * 100
    with pytest.raises(TokenizerError, match="more than the context length 77"):
        tokenize(long)
    cut = tokenize(long, truncate=True)[0]
    assert cut[-1] == EOT_ID and (cut != 0).all()


def test_hf_files_round_trip(tmp_path):
    default_tokenizer().save_hf_files(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 48_895
    again = Tokenizer.from_directory(tmp_path)
    text = [s for s in prompts.sentences("metal_nut")]
    np.testing.assert_array_equal(again(text), tokenize(text))
    assert len(again.encoder) == 49_408


def test_missing_vocabulary_is_explained(tmp_path, monkeypatch):
    import importlib.metadata

    from addinov3_jax.models import tokenizer

    with pytest.raises(TokenizerError, match="missing.txt.gz: CLIP BPE vocabulary file not found"):
        tokenizer.find_vocab(tmp_path / "missing.txt.gz")

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    monkeypatch.setenv("ADDINOV3_BPE_VOCAB", str(tmp_path / "none.gz"))
    with pytest.raises(TokenizerError, match="pip install --no-deps open_clip_torch"):
        tokenizer.find_vocab()
