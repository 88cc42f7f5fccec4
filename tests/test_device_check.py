"""`benchmarks/device_check.py --cpu-smoke` runs and writes the documented JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_writes_schema(tmp_path):
    out = tmp_path / "tmp.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"),
                           "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
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
    assert "backbone_forward" in proc.stdout  # the table


def test_peak_table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import device_check
    finally:
        sys.path.pop(0)
    assert device_check.peak_tflops("NVIDIA H200") == 989.4
    assert device_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_check.peak_tflops("NVIDIA L40S") == 362.1
    assert device_check.peak_tflops("NVIDIA L4") == 121.0
    assert device_check.peak_tflops("TPU v5 lite") == 197.0
    assert device_check.peak_tflops("TPU v4") == 275.0
    assert device_check.peak_tflops("cpu") is None
