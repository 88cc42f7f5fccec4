"""The README's Python block runs as written, on a tiny model saved where `make demo` puts its
model."""

import re
from pathlib import Path

from flax import nnx

from addinov3_jax.io import model_dir
from addinov3_jax.models import clip_text, dinov3
from addinov3_jax.models import model as ad

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    model = ad.ADDinoV3(dinov3.create("tiny", rngs=nnx.Rngs(0)),
                        clip_text.create("tiny", rngs=nnx.Rngs(1)),
                        ad.HeadConfig(feature_layers=(0, 1, 2, 3)), rngs=nnx.Rngs(2))
    model_dir.save(model, tmp_path / "demo_out" / "train" / "model")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["maps"].shape == (2, 128, 128) and namespace["feats"].shape[0] == 2
    assert "aupro" in capsys.readouterr().out
