"""One record per image, decoding of images and masks, and the bad-sample policy.

Every reader produces `Record`s; the raw-folder source and the ArrayRecord source both decode the
original file bytes with `decode_image` / `decode_mask`, so they yield identical pixels.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Every suffix here is one Pillow decodes (WebP needs Pillow's libwebp, part of every wheel).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# An 8-bit mask below 128 with at most this many distinct values is read as labels (non-zero = anomalous).
MAX_LABEL_LEVELS = 16


class DataError(ValueError):
    """Bad input: the message names the file / folder and says what to do."""


@dataclasses.dataclass(frozen=True)
class Record:
    dataset: str
    split: str
    class_folder: str  # as on disk: "metal_nut", "candle", "01"
    class_name: str  # readable: "metal nut", "candle", "skin"
    image_path: str
    mask_path: str | None  # None: normal image, or an anomaly without pixel annotation
    label: int  # 0 normal, 1 anomalous
    defect: str = ""

    def object_word(self, source: str = "readable", fixed_word: str = "") -> str:
        """The word put into the prompts (see `object_word`)."""
        return object_word(source, self.class_name, Path(self.image_path).parts[-4], fixed_word)

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None


# The choices of `model.class_name_source` (config.py reads them from here).
CLASS_NAME_SOURCES = ("readable", "path", "fixed")


def object_word(source: str, class_name: str, path_word: str, fixed_word: str = "") -> str:
    """The object word for the prompts, by `class_name_source`:

    "readable": the dataset's readable class name ("metal nut"); "path": the official code's
    `image_path.split('/')[-4]` ("Data" for every VisA class, "01" for BTAD...); "fixed": the
    same `fixed_word` for every class (what the official VisA training amounts to, and the right
    choice when the text tower is random and names carry no meaning).
    """
    if source == "readable":
        return class_name
    if source == "path":
        return path_word
    if source == "fixed" and fixed_word:
        return fixed_word
    if source == "fixed":
        raise ValueError("class_name_source 'fixed' needs the word (model.class_name)")
    raise ValueError(f"class_name_source must be one of {CLASS_NAME_SOURCES}, got {source!r}")


@dataclasses.dataclass
class Report:
    """What a reader skipped or dropped, and why."""

    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)

    def add(self, path: str, reason: str, policy: str) -> None:
        if policy == "error":
            raise DataError(f"{path}: {reason} (use on_bad_sample='skip' / --on-bad-sample skip "
                            "to skip such samples and list them in the report)")
        self.skipped.append((str(path), reason))

    def summary(self) -> str:
        lines = [f"skipped {len(self.skipped)} sample(s), dropped {len(self.duplicates)} duplicate(s)"]
        lines += [f"  skipped {p}: {r}" for p, r in self.skipped]
        lines += [f"  duplicate {p}" for p in self.duplicates]
        return "\n".join(lines)


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (the official pairing order)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _open(data: bytes, what: str) -> Image.Image:
    img = _open_lazy(data, what)
    _load(img, what)
    return img


def _load(img: Image.Image, what: str) -> None:
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{what}: unreadable or truncated image ({type(e).__name__}: {e})") from e


def decode_image(data: bytes, what: str = "image", *, max_side: int | None = None) -> Image.Image:
    """RGB PIL image from file bytes, upright: the EXIF orientation is applied (as every photo
    viewer does), grayscale replicated, alpha dropped, 16-bit scaled, CMYK / palette converted.

    `max_side`: an image whose longest side is larger comes back reduced to fit (aspect kept),
    decoded at reduced scale where the format allows (JPEG DCT scaling), so a 48-megapixel photo
    never exists as full-size pixels; images that fit are returned exactly as without it."""
    img = _open_lazy(data, what)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the size asked for.
        img.draft("RGB", (max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))))
    _load(img, what)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.BILINEAR, reducing_gap=2.0)
    return img


def _open_lazy(data: bytes, what: str) -> Image.Image:
    """The image's header (pixels not decoded yet); errors as `DataError`."""
    if not data:
        raise DataError(f"{what}: empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise DataError(f"{what}: unreadable or truncated image (not a format Pillow recognises)") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{what}: unreadable image ({type(e).__name__}: {e})") from e


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied), from the header only."""
    img = _open_lazy(data, what)
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: as stored
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_mask(data: bytes, what: str = "mask") -> Image.Image:
    """8-bit 'L' mask (0 = normal, 255 = anomalous) from file bytes.

    The pipelines binarise the mask at a threshold on the 0-255 scale (0.5 -> 128), so a mask that
    uses another encoding would silently vanish (shared/reference/datasets.md, pitfall 2). Here:
    * 1-bit masks, 8-bit 0/255 masks and 8-bit masks with values >= 128 (anti-aliased or JPEG
      masks) are kept as they are;
    * 8-bit label masks whose maximum is below 128 (0/1, or a few small label values as VisA
      stores them) are converted: any non-zero value is anomalous (255);
    * 8-bit masks below 128 with many grey levels (not labels, not 0/255) are refused: no pixel
      would pass the threshold and there is no safe reading of them;
    * palette, 16-bit and 32-bit masks count any non-zero value as anomalous; RGB(A) masks are
      converted to grayscale and checked like 8-bit ones.
    """
    img = _open(data, what)
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray((np.asarray(img) != 0).astype(np.uint8) * 255, "L")
    img = img.convert("L")
    arr = np.asarray(img)
    top = int(arr.max()) if arr.size else 0
    if top == 0 or top >= 128:
        return img
    levels = np.flatnonzero(np.bincount(arr.reshape(-1), minlength=256))
    if len(levels) <= MAX_LABEL_LEVELS:  # a label mask (0/1, 0..k): non-zero = anomalous
        return Image.fromarray((arr != 0).astype(np.uint8) * 255, "L")
    raise DataError(f"{what}: mask values go from 0 to {top} in {len(levels)} grey levels, so no "
                    "pixel reaches the 0.5 threshold (128 of 255); store masks as 0/255 "
                    "(or 0/1 labels)")


def _verified_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        size = img.size
        img.verify()
    return size


def check_sample(record: Record) -> str | None:
    """Why the record's files cannot be used (None when they can). Decodes the image fully (to
    catch truncated pixel data) and verifies the mask's header and size."""
    try:
        _verified_size(record.image_path)
        size = image_size(Path(record.image_path).read_bytes())  # upright, as decode_image gives
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"unreadable or truncated image ({type(e).__name__}: {e})"
    if record.mask_path is not None:
        try:
            msize = _verified_size(record.mask_path)
        except Exception as e:  # noqa: BLE001
            return f"unreadable mask {record.mask_path} ({type(e).__name__}: {e})"
        if msize != size:
            return f"mask {record.mask_path} is {msize[0]}x{msize[1]} but the image is {size[0]}x{size[1]}"
    try:  # verify() does not catch truncated pixel data: decode fully
        decode_image(Path(record.image_path).read_bytes(), record.image_path)
    except DataError as e:
        return str(e)
    return None
