"""The config: validated at load with one-line errors (unknown keys, types, enums, meshes,
sizes, taps), mesh rules, the few-shot and calibration fields."""

import pytest
import runs

from addinov3_jax import config as config_lib
from addinov3_jax.models import sharding


@pytest.mark.parametrize("args, fragments", [
    (["--config.train.epoch=3"], ["epoch"]),
    (["--config.train.epochs=two"], ["epochs", "two"]),
    (["--config.model.text_layout=diagonal"], ["model.text_layout", "stack", "interleave"]),
    (["--config.train.feature_cache=gpu"], ["train.feature_cache", "device", "disk"]),
    (["--config.mesh.fsdp=0"], ["mesh.fsdp"]),
    (["--config.data.image_size=100"], ["data.image_size", "multiple"]),
    (["--config.train.warmup_fraction=1.5"], ["train.warmup_fraction"]),
    (["--config.model.feature_layers=(0, 1, 9)"], ["model.feature_layers", "9"]),
], ids=["unknown-key", "wrong-type", "enum", "enum-cache", "mesh", "image-size", "warmup", "taps"])
def test_bad_config_is_one_clear_line(args, fragments, tmp_path, capsys):
    from addinov3_jax.commands import cli

    rc = cli.main(["train", "--config", str(runs.REPO / "configs" / "demo.py"), "--workdir",
                   str(tmp_path / "w"), *args])
    err = capsys.readouterr().err
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("addinov3 train: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not (tmp_path / "w").exists()


def test_unknown_config_arg_and_rules_are_refused():
    with pytest.raises(config_lib.ConfigError, match="unknown argument 'bogus'"):
        config_lib.demo_config("bogus")
    c = config_lib.demo_config()
    c.mesh.rules = (("batch", "nope"),)
    with pytest.raises(config_lib.ConfigError, match="unknown mesh axes"):
        config_lib.validate(c)
    c.mesh.rules = sharding.DEFAULT_RULES[:-1]
    with pytest.raises(config_lib.ConfigError, match="no entry for the logical names"):
        config_lib.validate(c)
    c.mesh.rules = tuple((k, "fsdp" if k == "adapter" else v) for k, v in sharding.DEFAULT_RULES)
    with pytest.raises(config_lib.ConfigError, match=r"would use the mesh axes \['fsdp'\] twice"):
        config_lib.validate(c)
    c.mesh.rules = sharding.rules_preset("replicated")
    assert config_lib.validate(c).mesh.rules == sharding.REPLICATED_RULES


def test_fewshot_fields(tmp_path):
    c = config_lib.demo_config()
    assert config_lib.fewshot_config(c).shots == 0
    c.eval.shots, c.eval.shot_seeds = 4, (0, 1, 2)
    c.eval.fewshot.fusion_weight = 2.0
    fs = config_lib.fewshot_config(config_lib.validate(c))
    assert (fs.shots, fs.seeds, fs.fusion_weight) == (4, (0, 1, 2), 2.0)
    for field, value, match in (("augment", "mirror", "eval.fewshot.augment='mirror' is not one of"),
                                ("coreset_ratio", 1.5, "eval.fewshot.coreset_ratio must be in"),
                                ("smoothing_sigma", -1.0, "eval.fewshot.smoothing_sigma=-1.0")):
        bad = config_lib.demo_config()
        bad.eval.fewshot[field] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(bad)
    bad = config_lib.demo_config()
    bad.eval.shot_seeds = ()
    with pytest.raises(config_lib.ConfigError, match="eval.shot_seeds"):
        config_lib.validate(bad)
    from addinov3_jax.commands.cli import load_config

    demo = str(runs.REPO / "configs" / "demo.py")
    c = load_config(demo, ["--config.eval.shots=2", "--config.eval.shot_seeds=(0,1,2)"])
    assert config_lib.fewshot_config(c).seeds == (0, 1, 2) and c.eval.shots == 2
    with pytest.raises(config_lib.ConfigError, match="eval.shots"):
        load_config(demo, ["--config.eval.shots=-1"])


def test_calibration_config_field_is_validated():
    c = config_lib.demo_config()
    assert c.eval.calibration.false_alarm_rate == 0.0
    c.eval.calibration.false_alarm_rate = 1.5
    with pytest.raises(config_lib.ConfigError, match="eval.calibration.false_alarm_rate=1.5"):
        config_lib.validate(c)
