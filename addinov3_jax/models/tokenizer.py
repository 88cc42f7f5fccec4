"""The CLIP byte-level BPE tokenizer, producing the ids of OpenAI's `clip.tokenize`.

Algorithm (shared/reference/clip_text.md §3): ftfy + double HTML unescape, whitespace collapse,
lower case, the CLIP pre-tokenizer regex, UTF-8 bytes mapped through the GPT-2 byte table, BPE
with `</w>` on the last symbol of each word, then `[SOT] ids [EOT]` zero-padded to the context.

The vocabulary comes from `bpe_simple_vocab_16e6.txt.gz` or from HF `vocab.json` + `merges.txt`.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merge lines 1..48894 of the vocabulary file

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(ValueError):
    pass


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 table: printable bytes map to themselves, the other 68 to chr(256 + n).

    Insertion order matters: the vocabulary lists the printable bytes first, then the others.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean(text: str) -> str:
    """ftfy, double HTML unescape, whitespace collapse, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def find_vocab(path: str | os.PathLike | None = None) -> Path:
    """Locates `bpe_simple_vocab_16e6.txt.gz`: explicit path, $ADDINOV3_BPE_VOCAB, or the file
    inside an installed `open_clip_torch` wheel (read as data; open_clip is never imported)."""
    if path is not None:  # an explicit file is the only candidate
        if Path(path).is_file():
            return Path(path)
        raise TokenizerError(f"{path}: CLIP BPE vocabulary file not found")
    candidates = []
    if os.environ.get("ADDINOV3_BPE_VOCAB"):
        candidates.append(Path(os.environ["ADDINOV3_BPE_VOCAB"]))
    try:
        for f in importlib.metadata.files("open_clip_torch") or []:
            if f.name == VOCAB_FILE:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise TokenizerError(
        f"CLIP BPE vocabulary {VOCAB_FILE} not found (looked at: "
        f"{', '.join(map(str, candidates)) or 'nothing'}). Install it with "
        "`pip install --no-deps open_clip_torch==3.3.0`, set ADDINOV3_BPE_VOCAB=/path/to/file, "
        "or load the tokenizer from a converted text-tower directory."
    )


class Tokenizer:
    """CLIP BPE tokenizer. `encode(text)` gives BPE ids; `__call__(texts)` the padded id matrix."""

    def __init__(self, merges: Sequence[tuple[str, str]], vocab: dict[str, int] | None = None):
        b2u = byte_to_unicode()
        if vocab is None:
            symbols = list(b2u.values())
            symbols += [s + "</w>" for s in symbols]
            symbols += ["".join(m) for m in merges]
            symbols += [SOT, EOT]
            vocab = {s: i for i, s in enumerate(symbols)}
        self.encoder = vocab
        self.decoder = {i: s for s, i in vocab.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        if vocab.get(SOT) != SOT_ID or vocab.get(EOT) != EOT_ID:
            raise TokenizerError(f"vocabulary does not put {SOT}/{EOT} at {SOT_ID}/{EOT_ID}")
        self._cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        with gzip.open(find_vocab(path), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{path}: not a CLIP BPE vocabulary ({len(merges)} merges)")
        return cls(merges)

    @classmethod
    def from_hf_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> Tokenizer:
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines
                  if line and not line.startswith("#version")]
        return cls(merges, vocab)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
        """From a converted text-tower directory or an HF tokenizer directory."""
        d = Path(directory)
        if (d / VOCAB_FILE).is_file():
            return cls.from_bpe_file(d / VOCAB_FILE)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_hf_files(d / "vocab.json", d / "merges.txt")
        raise TokenizerError(f"{d}: holds neither {VOCAB_FILE} nor vocab.json + merges.txt")

    def save_hf_files(self, directory: str | os.PathLike) -> None:
        """Writes HF-style `vocab.json` and `merges.txt` for this vocabulary."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), "utf-8")
        merges = sorted(self.ranks, key=self.ranks.get)
        (d / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")

    # -- encoding -------------------------------------------------------------------------

    def bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without SOT / EOT."""
        b2u = byte_to_unicode()
        ids = []
        for piece in _PATTERN.findall(clean(text)):
            piece = "".join(b2u[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        u2b = {u: b for b, u in byte_to_unicode().items()}
        data = bytearray()
        for i in ids:
            symbol = self.decoder[int(i)]
            if symbol in (SOT, EOT):
                continue
            end = symbol.endswith("</w>")
            data += bytes(u2b[c] for c in symbol.removesuffix("</w>"))
            if end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
    ) -> np.ndarray:
        """(N, context_length) int32 ids `[SOT, ..., EOT, 0, ...]`, like `clip.tokenize`.

        Too-long input raises unless `truncate=True` (then the last kept id is forced to EOT).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text), EOT_ID]
            if len(ids) > context_length:
                if not truncate:
                    raise TokenizerError(
                        f"text {row} ({text[:40]!r}...) has {len(ids)} tokens, more than the "
                        f"context length {context_length}; shorten it or pass truncate=True")
                ids = ids[:context_length]
                ids[-1] = EOT_ID
            out[row, : len(ids)] = ids
        return out


@functools.cache
def default_tokenizer() -> Tokenizer:
    return Tokenizer.from_bpe_file()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> np.ndarray:
    """`clip.tokenize` with the default vocabulary (see `find_vocab`)."""
    return default_tokenizer()(texts, context_length, truncate)
