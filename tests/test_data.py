"""Datasets: readers for every layout, meta.json, the user folder, TFDS round trip, grain
pipelines (resume, sharding, padded eval), the synthetic generator and bad input."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from addinov3_jax.data import pipeline, readers, synthetic, tfds_builders
from addinov3_jax.data.records import DataError


def img(path, size=(24, 20), mode="RGB", value=None, fmt=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    w, h = size
    if mode == "RGB":
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif mode == "RGBA":
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    elif mode == "I;16":
        arr = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    else:
        arr = np.full((h, w), 255 if value is None else value, np.uint8)
        arr[: h // 2] = 0
    Image.fromarray(arr, mode if mode != "I;16" else None).save(path, format=fmt)
    return path


def mvtec_like(root, classes, normal="good", ext=".png", defects=("crack",), n_normal=2, n_bad=2,
               mask_ext=".png", mask_suffix="_mask"):
    for c in classes:
        for i in range(n_normal):
            img(root / c / "test" / normal / f"{i:03d}{ext}")
        for d in defects:
            for i in range(n_bad):
                img(root / c / "test" / d / f"{i:03d}{ext}")
                img(root / c / "ground_truth" / d / f"{i:03d}{mask_suffix}{mask_ext}", mode="L")
    return root


@pytest.mark.parametrize("name,classes,normal,ext,mask_ext,suffix", [
    ("mvtec", ["bottle", "metal_nut"], "good", ".png", ".png", "_mask"),
    ("btad", ["01", "02", "03"], "ok", ".bmp", ".png", ""),
    ("mpdd", ["tubes"], "good", ".png", ".png", "_mask"),
    ("isic", ["01"], "good", ".jpg", ".png", "_Segmentation"),
    ("colondb", ["01"], "good", ".png", ".png", ""),
    ("clinicdb", ["01"], "good", ".tif", ".tif", ""),
])
def test_mvtec_style_layouts(tmp_path, name, classes, normal, ext, mask_ext, suffix):
    n_normal = 0 if name in ("isic", "colondb", "clinicdb") else 2
    mvtec_like(tmp_path, classes, normal, ext, n_normal=n_normal, mask_ext=mask_ext, mask_suffix=suffix)
    records, report = readers.read(name, tmp_path, classes=classes)
    assert len(records) == len(classes) * (n_normal + 2) and not report.skipped
    for r in records:
        assert r.label == (r.defect != normal)
        assert (r.mask_path is not None) == bool(r.label)
        if r.mask_path:  # paired by sorted position: same number
            assert Path(r.mask_path).name.startswith(Path(r.image_path).stem)
    assert {r.class_name for r in records} == {readers.DATASETS[name].readable[c] for c in classes}
    assert records[0].object_word("path") == classes[0]


def test_visa_layout(tmp_path):
    rows = ["object,split,label,image,mask"]
    for c in ("candle", "pcb1"):
        for i in range(2):
            img(tmp_path / c / "Data/Images/Normal" / f"{i:04d}.JPG", fmt="JPEG")
            rows.append(f"{c},test,normal,{c}/Data/Images/Normal/{i:04d}.JPG,")
            img(tmp_path / c / "Data/Images/Anomaly" / f"{i:03d}.JPG", fmt="JPEG")
            img(tmp_path / c / "Data/Masks/Anomaly" / f"{i:03d}.png", mode="L", value=1)  # not 0/255
            rows.append(f"{c},test,anomaly,{c}/Data/Images/Anomaly/{i:03d}.JPG,{c}/Data/Masks/Anomaly/{i:03d}.png")
        rows.append(f"{c},train,normal,{c}/Data/Images/Normal/0000.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    records, _ = readers.read("visa", tmp_path)
    assert len(records) == 8 and sum(r.label for r in records) == 4
    assert {r.object_word("path") for r in records} == {"Data"}  # the official quirk
    assert {r.object_word() for r in records} == {"candle", "printed circuit board"}
    anomalous = next(r for r in records if r.label)
    pre = pipeline.Preprocess(size=(20, 24), mask_threshold=readers.DATASETS["visa"].mask_threshold)
    ex = pre(pipeline.record_to_example(anomalous))
    assert ex["mask"].sum() > 0  # mask value 1 counts as anomalous (> 0)
    # meta.json round trip gives the same records.
    readers.write_meta(tmp_path, records)
    meta_records, _ = readers.read("meta:visa", tmp_path)
    assert [(r.image_path, r.mask_path, r.label) for r in meta_records] == [
        (r.image_path, r.mask_path, r.label) for r in sorted(records, key=lambda r: r.class_folder)]


def test_tn3k_layout(tmp_path):
    for i in range(3):
        img(tmp_path / "test-image" / f"{i:04d}.jpg", fmt="JPEG")
        img(tmp_path / "test-mask" / f"{i:04d}.jpg", mode="L", fmt="JPEG")
    records, _ = readers.read("tn3k", tmp_path)
    assert len(records) == 3 and all(r.label == 1 and r.has_mask for r in records)
    assert records[0].class_name == "thyroid"


def test_user_folder(tmp_path):
    for c in ("widget", "gear_box"):
        img(tmp_path / c / "normal" / "a.png")
        img(tmp_path / c / "anomalous" / "b.png")
    img(tmp_path / "widget" / "masks" / "b_mask.png", mode="L")
    records, _ = readers.read("folder", tmp_path)
    widget = [r for r in records if r.class_folder == "widget"]
    gear = [r for r in records if r.class_folder == "gear_box"]
    assert [r.label for r in widget] == [0, 1] and widget[1].mask_path.endswith("b_mask.png")
    assert gear[1].label == 1 and gear[1].mask_path is None  # image-level only class
    assert gear[0].class_name == "gear box"


def test_synthetic_is_deterministic(tmp_path):
    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(root).rglob("*.png")))).hexdigest()

    a = synthetic.generate(tmp_path / "a", categories=("weave", "washer"), size=64, normal=2, per_defect=1)
    b = synthetic.generate(tmp_path / "b", categories=("weave", "washer"), size=64, normal=2, per_defect=1)
    assert digest(a) == digest(b)
    records, _ = readers.read("synthetic", a, classes=["weave", "washer"])
    assert len(records) == 2 * (2 + 3)
    for r in records:
        if r.label:
            m = np.asarray(Image.open(r.mask_path))
            assert set(np.unique(m)) == {0, 255} and (m > 0).sum() > 5


N_SYN = len(synthetic.CATEGORIES) * (2 + 3)  # images of the `syn` fixture


@pytest.fixture(scope="module")
def syn(synthetic_data):
    return synthetic_data(size=64, normal=2, per_defect=1)  # every category


def test_tfds_round_trip_equals_raw_reader(syn, tmp_path):
    builder = tfds_builders.build("synthetic", syn, tmp_path / "tfds")
    assert builder.info.splits["test"].num_examples == N_SYN
    stored = tfds_builders.data_source("synthetic", tmp_path / "tfds")
    raw = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    assert len(stored) == len(raw)
    classes = pipeline.class_words(raw)
    assert pipeline.class_words(stored) == classes
    pre = pipeline.Preprocess(size=(32, 32), classes=classes)
    for i in range(len(raw)):
        a, b = raw[i], stored[i]
        assert a["image"] == b["image"] and a["mask"] == b["mask"]
        for k in ("class_name", "image_path", "defect", "object_word_path"):
            assert a[k] == b[k].decode()
        pa, pb = pre(a), pre(b)
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])


def test_preprocess_matches_official_transform(syn):
    r = readers.read("synthetic", syn, classes=["pill"])[0][-1]
    ex = pipeline.Preprocess(size=(40, 48))(pipeline.record_to_example(r))
    pil = Image.open(r.image_path).convert("RGB").resize((48, 40), Image.BILINEAR)
    expected = (np.asarray(pil, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(ex["image"], expected, atol=1e-6)
    m = np.asarray(Image.open(r.mask_path).convert("L").resize((48, 40), Image.BILINEAR)) / 255 > 0.5
    np.testing.assert_array_equal(ex["mask"], m.astype(np.float32))
    assert ex["image"].shape == (40, 48, 3) and ex["label"] == 1
    # The backbone's statistics (e.g. the SAT-493M weights') are what the pipeline applies.
    from addinov3_jax.models import dinov3

    sat = dinov3.VARIANTS["vitl16_sat493m"]
    assert sat.pixel_mean != dinov3.IMAGENET_MEAN
    ex_sat = pipeline.Preprocess(size=(40, 48), mean=sat.pixel_mean, std=sat.pixel_std)(
        pipeline.record_to_example(r))
    expected = (np.asarray(pil, np.float32) / 255 - sat.pixel_mean) / sat.pixel_std
    np.testing.assert_allclose(ex_sat["image"], expected, atol=1e-6)
    np.testing.assert_array_equal(
        pipeline.preprocess_image(Image.open(r.image_path), (40, 48), sat.pixel_mean, sat.pixel_std),
        ex_sat["image"])


def test_train_iterator_resume_and_epochs(syn):
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    pre = pipeline.Preprocess(size=(16, 16), classes=pipeline.class_words(src))
    ds = pipeline.train_dataset(src, pre, batch_size=4, seed=3, num_epochs=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state["step"] == 3 and state["order"] == pipeline.ORDER
    rest = [b["image"] for b in it]
    again = iter(pipeline.train_dataset(src, pre, batch_size=4, seed=3, num_epochs=2))
    again.set_state(state)
    resumed = [b["image"] for b in again]
    assert len(rest) == len(resumed) == 2 * (N_SYN // 4) - 3  # batches run across epochs
    for a, b in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch is a different permutation of the same examples.
    one = pipeline.train_dataset(src, pre, batch_size=1, seed=3, num_epochs=2)
    ids = [int(b["index"][0]) for b in one]
    assert ids[:N_SYN] != ids[N_SYN:] and sorted(ids[:N_SYN]) == sorted(ids[N_SYN:]) == list(range(N_SYN))


def _order(data):
    return [b["index"].tolist() for b in data]


def test_process_rows_partition_each_global_batch(syn):
    """Two processes reading rows [0, 4) and [4, 8) of each global batch of 8 read disjoint
    examples and together exactly the one-process batches."""
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    one = _order(pipeline.train_dataset(src, None, batch_size=8, seed=0, num_epochs=3))
    two = [_order(pipeline.train_dataset(src, None, batch_size=8, seed=0, num_epochs=3, rows=r))
           for r in (range(4), range(4, 8))]
    assert len(one) == 3 * (N_SYN // 8)
    assert [a + b for a, b in zip(*two, strict=True)] == one
    assert all(not set(a) & set(b) for a, b in zip(*two, strict=True))
    assert one[0] == pipeline.epoch_order(N_SYN, 0, 0)[:8].tolist()


def test_iterator_state_is_global_and_resumes_on_another_topology(syn):
    """A position saved by process 1 of two resumes a one-process run (and the reverse) on the
    same sequence of global batches; old per-process grain states are refused."""
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    kw = dict(batch_size=8, seed=5, num_epochs=3)
    full = _order(pipeline.train_dataset(src, None, **kw))
    it = iter(pipeline.train_dataset(src, None, rows=range(4, 8), **kw))
    for _ in range(4):
        next(it)
    state = it.get_state()
    assert state == {"order": pipeline.ORDER, "epoch": 4 // (N_SYN // 8), "step": 4,
                     "batch_size": 8, "seed": 5, "num_examples": N_SYN}
    resumed = iter(pipeline.train_dataset(src, None, **kw))
    resumed.set_state(state)
    assert _order(resumed) == full[4:]
    back = iter(pipeline.train_dataset(src, None, rows=range(4), **kw))
    back.set_state(state)
    assert _order(back) == [b[:4] for b in full[4:]]
    with pytest.raises(DataError, match="older format"):
        back.set_state({"next_index": 12})
    with pytest.raises(DataError, match="seed=5, this one has 6"):
        iter(pipeline.train_dataset(src, None, **dict(kw, seed=6))).set_state(state)


def test_ordered_batches_cover_every_example_once(syn):
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    parts = [list(pipeline.ordered_batches(src, None, batch_size=8, rows=r))
             for r in (range(4), range(4, 8))]
    index = np.concatenate([np.concatenate([a["index"], b["index"]]) for a, b in zip(*parts, strict=True)])
    valid = np.concatenate([np.concatenate([a["valid"], b["valid"]]) for a, b in zip(*parts, strict=True)])
    assert len(index) == -(-N_SYN // 8) * 8
    np.testing.assert_array_equal(index[valid == 1], np.arange(N_SYN))


def test_eval_dataset_is_ordered_complete_and_padded(syn):
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    pre = pipeline.Preprocess(size=(16, 16))
    batches = list(pipeline.eval_dataset(src, pre, batch_size=8))
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(batches) == -(-N_SYN // 8) and valid.sum() == N_SYN and not valid[N_SYN:].any()
    np.testing.assert_array_equal(index[valid == 1], np.arange(N_SYN))
    shards = [list(pipeline.eval_dataset(src, pre, batch_size=4, shard_index=s, shard_count=2))
              for s in range(2)]
    assert len(shards[0]) == len(shards[1])
    got = np.concatenate([b["index"][b["valid"] == 1] for s in shards for b in s])
    np.testing.assert_array_equal(np.sort(got), np.arange(N_SYN))


# ------------------------------------------------------------------------------ bad input


def test_bad_images_and_masks(tmp_path):
    root = mvtec_like(tmp_path, ["bottle"], n_bad=3)
    truncated = root / "bottle/test/crack/001.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="001.png: unreadable or truncated"):
        readers.read("mvtec", root, classes=["bottle"])
    records, report = readers.read("mvtec", root, classes=["bottle"], on_bad_sample="skip")
    assert len(records) == 4 and report.skipped[0][0].endswith("001.png")
    img(root / "bottle/ground_truth/crack/002_mask.png", size=(10, 10), mode="L")
    truncated.unlink()
    (root / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DataError, match="mask .* is 10x10 but the image is 24x20"):
        readers.read("mvtec", root, classes=["bottle"], on_bad_sample="error")
    assert "002.png" in readers.read("mvtec", root, classes=["bottle"], on_bad_sample="skip")[1].summary()


def test_anomaly_without_mask_is_never_mislabelled(tmp_path):
    root = mvtec_like(tmp_path, ["bottle"], n_bad=3)
    (root / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DataError, match="anomalous image without a mask .*3 images but 2 masks"):
        readers.read("mvtec", root, classes=["bottle"])
    records, report = readers.read("mvtec", root, classes=["bottle"], on_bad_sample="skip")
    paired = {Path(r.image_path).stem: Path(r.mask_path).stem for r in records if r.label}
    assert paired == {"000": "000_mask", "002": "002_mask"}  # matched by name, not position
    assert report.skipped[0][0].endswith("001.png")


def test_image_modes_decode_to_rgb(tmp_path):
    for mode in ("RGBA", "L", "I;16"):
        p = img(tmp_path / f"x_{mode.replace(';', '')}.png", mode=mode)
        from addinov3_jax.data.records import decode_image

        out = decode_image(p.read_bytes())
        assert out.mode == "RGB" and out.size == (24, 20)
    p16 = tmp_path / "x_I16.png"
    arr16 = np.asarray(Image.open(p16), np.float64)
    np.testing.assert_allclose(np.asarray(decode_image(p16.read_bytes()))[..., 0],
                               np.clip(arr16 / 257 + 0.5, 0, 255).astype(np.uint8))


def test_empty_and_unknown_classes(tmp_path):
    root = mvtec_like(tmp_path, ["bottle"])
    (root / "cable" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="cable/test: empty class folder"):
        readers.read("mvtec", root, classes=["bottle", "cable"])
    assert len(readers.read("mvtec", root, classes=["bottle", "cable"], on_bad_sample="skip")[0]) == 4
    with pytest.raises(DataError, match=r"unknown class name\(s\) \['bottel'\].*bottle"):
        readers.read("mvtec", root, classes=["bottel"])
    with pytest.raises(DataError, match="unknown dataset 'mvtecad'"):
        readers.read("mvtecad", root)


def test_bad_meta_json_and_duplicates(tmp_path):
    root = mvtec_like(tmp_path, ["bottle"])
    records, _ = readers.read("mvtec", root, classes=["bottle"])
    meta_path = readers.write_meta(root, records)
    meta = json.loads(meta_path.read_text())
    meta["test"]["bottle"].append(meta["test"]["bottle"][0])  # duplicate entry
    meta_path.write_text(json.dumps(meta))
    recs, report = readers.read("meta:mvtec", root, classes=["bottle"])
    assert len(recs) == 4 and len(report.duplicates) == 1
    meta["test"]["bottle"][0]["img_path"] = str(root / meta["test"]["bottle"][0]["img_path"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="absolute path"):
        readers.read("meta:mvtec", root, classes=["bottle"])
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="malformed meta.json"):
        readers.read("meta:mvtec", root, classes=["bottle"])


def test_data_cli(tmp_path, capsys):
    from addinov3_jax.commands.cli import main

    assert main(["data", "synthetic", "--output", str(tmp_path / "s"), "--size", "48",
                 "--normal", "1", "--per-defect", "1"]) == 0
    assert main(["data", "inspect", "synthetic", "--root", str(tmp_path / "s")]) == 0
    assert "washer" in capsys.readouterr().out
    assert main(["data", "make-meta", "synthetic", "--root", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "meta.json").is_file()
    assert main(["data", "inspect", "mvtec", "--root", str(tmp_path / "missing")]) == 2


def test_worker_prefetch_gives_the_same_batches(syn):
    src = pipeline.RecordSource(readers.read("synthetic", syn)[0])
    pre = pipeline.Preprocess(size=(16, 16), classes=pipeline.class_words(src))
    plain = [b["image"] for b in pipeline.train_dataset(src, pre, batch_size=8, seed=1, num_epochs=1)]
    workers = [b["image"] for b in pipeline.train_dataset(src, pre, batch_size=8, seed=1,
                                                          num_epochs=1, worker_count=2)]
    assert len(plain) == len(workers) == N_SYN // 8
    for a, b in zip(plain, workers, strict=True):
        np.testing.assert_array_equal(a, b)


def _visa_root(tmp_path, label):
    img(tmp_path / "candle/Data/Images/Anomaly/000.JPG", fmt="JPEG")
    img(tmp_path / "candle/Data/Masks/Anomaly/000.png", mode="L")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        f"candle,test,{label},candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n")
    return tmp_path


@pytest.mark.parametrize("label,fragment", [
    ("Anomaly", r"1cls.csv: row 2 \(candle/Data/Images/Anomaly/000.JPG\): label 'Anomaly'"),
    ("anomalous", "label 'anomalous' is neither 'normal' nor 'anomaly'"),
    ("", "label '' is neither"),
])
def test_visa_unknown_label_is_refused(tmp_path, label, fragment):
    with pytest.raises(DataError, match=fragment):
        readers.read("visa", _visa_root(tmp_path, label))


def _mask_png(path, arr):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # mode from the dtype: bool -> "1", uint16 -> "I;16"
    return path.read_bytes()


def _square(value, dtype=np.uint8):
    arr = np.zeros((16, 16), dtype)
    arr[4:12, 4:12] = value
    return arr


@pytest.mark.parametrize("name,arr", [
    ("0_255", _square(255)),
    ("0_1", _square(1)),  # stored as 0/1: would vanish under > 0.5 on the 0-255 scale
    ("labels_0_3", np.where(_square(1) > 0, np.arange(16)[None] % 3 + 1, 0).astype(np.uint8)),
    ("one_bit", _square(1).astype(bool)),
    ("uint16_0_1", _square(1, np.uint16)),
    ("rgb_0_1", np.repeat(_square(1)[..., None], 3, -1)),
])
def test_mask_encodings_never_vanish(tmp_path, name, arr):
    from addinov3_jax.data.records import decode_mask

    m = decode_mask(_mask_png(tmp_path / f"{name}.png", arr), name)
    expected = np.zeros((16, 16), np.float32)
    expected[4:12, 4:12] = 1
    np.testing.assert_array_equal(pipeline.preprocess_mask(m, 16, 0.5), expected)
    assert pipeline.preprocess_mask(None, (4, 6)).shape == (4, 6)


@pytest.mark.parametrize("name,arr,fragment", [
    ("grey_ramp", (np.arange(256, dtype=np.uint8).reshape(16, 16) // 4),
     "grey_ramp: mask values go from 0 to 63 in 64 grey levels, so no pixel reaches the 0.5"),
])
def test_ambiguous_masks_are_refused(tmp_path, name, arr, fragment):
    from addinov3_jax.data.records import decode_mask

    with pytest.raises(DataError, match=fragment):
        decode_mask(_mask_png(tmp_path / f"{name}.png", arr), name)
