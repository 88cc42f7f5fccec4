"""The training benchmarks run the product's steps: `bench_train.py` and `bench_bf16.py` in
`--smoke` mode (tiny towers, 64 px, no PyTorch reference), in-process, so a benchmark that
breaks is caught here."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
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
