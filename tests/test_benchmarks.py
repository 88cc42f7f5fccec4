"""The benchmarks run the product's steps: `bench_train.py` and `bench_bf16.py` in `--smoke`
mode (tiny towers, 64 px, no PyTorch reference) and `device_check.py --cpu-smoke` (writes the
documented JSON), in-process, so a benchmark that breaks is caught here."""

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
    """`benchmarks/<name>.py` as a module, importing its neighbours (`_timing`, `_official`) as
    `python benchmarks/<name>.py` does."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_smoke(capsys):
    benchmark("bench_train").main(["--smoke"])
    out = capsys.readouterr().out
    assert "ours per image: features" in out and "epoch over 2162 images" in out


def test_bench_bf16_smoke(capsys):
    benchmark("bench_bf16").main(["--smoke"])
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "|bf16 - fp32| (points)" in out


def test_device_check_cpu_smoke_writes_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tmp.json"
    assert benchmark("device_check").main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device_kind", "peak_tflops", "platform", "jax_version", "date",
            "measurements"} <= set(report)
    assert report["platform"] == "cpu" and report["peak_tflops"] is None
    names = set()
    for m in report["measurements"]:
        assert {"name", "value", "unit", "batch", "dtype", "image_size"} <= set(m)
        assert isinstance(m["value"], float) and math.isfinite(m["value"]) and m["value"] >= 0
        names.add(m["name"])
    assert {"backbone_forward", "backbone_compile", "backbone_model_flops", "feature_cache_fill",
            "train_step_cached", "train_step_compile", "eval_end_to_end"} <= names
    assert "backbone_forward" in capsys.readouterr().out  # the table


def test_device_check_peak_table():
    device_check = benchmark("device_check")
    assert device_check.peak_tflops("NVIDIA H200") == 989.4
    assert device_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_check.peak_tflops("NVIDIA L40S") == 362.1
    assert device_check.peak_tflops("NVIDIA L4") == 121.0
    assert device_check.peak_tflops("TPU v5 lite") == 197.0
    assert device_check.peak_tflops("TPU v4") == 275.0
    assert device_check.peak_tflops("cpu") is None
