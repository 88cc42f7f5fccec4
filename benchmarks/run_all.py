"""`make bench`: runs every benchmark (CPU; minutes). Record results in benchmarks/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
QUICK = {  # arguments that keep `make bench` around ten minutes on a small CPU machine
    "bench_metrics.py": ["--maps", "100", "--size", "512"],
    "bench_pipeline.py": [],
    "bench_dinov3.py": ["--batches", "1", "--reps", "2"],
    "bench_predict.py": [],
    "bench_text.py": ["--torch-images", "1"],
    "bench_train.py": [],
}

if __name__ == "__main__":
    failed = []
    for name, extra in QUICK.items():
        print(f"== {name} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *extra]).returncode:
            failed.append(name)
    sys.exit(1 if failed else 0)
