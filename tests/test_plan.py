"""`addinov3 plan`: the memory plan of vit7b16 on an fsdp mesh (abstract shapes only, nothing
allocated): parameters, train state, the feature / train / predict steps and random init split
over the devices."""

import json

import runs


def test_plan_vit7b_fsdp8_splits_the_parameters(capsys):
    """`addinov3 plan` for vit7b16 on 8 devices (fsdp=8), from abstract shapes only."""
    from addinov3_jax.commands.cli import main

    assert main(["plan", "--config", str(runs.REPO / "configs" / "train_visa.py"), "--json",
                 "--config.model.backbone=vit7b16", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                 "--config.train.batch_size=64", "--config.data.image_size=512"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    total = p["frozen_param_bytes_total"]
    assert total > 25 * 2**30  # ~6.7 B fp32 parameters
    assert p["frozen_param_bytes_per_device"] <= total / 8 * 1.05
    assert p["train_state_bytes_per_device"] <= p["train_state_bytes_total"] / 8 * 1.05
    for step in ("feature_step", "train_step", "predict_step"):
        assert p[step]["temp_bytes_per_device"] > 0
    # The predict step of eval / predict also takes the parameters' shards only.
    assert p["predict_step"]["argument_bytes_per_device"] < total / 8 * 1.1
    # The feature step's parameter arguments are the shards, not the whole backbone.
    assert p["feature_step"]["argument_bytes_per_device"] < total / 8 * 1.1
    # Random init is born sharded: a device's output is its shard, and it is drawn one block at
    # a time, so its temporaries stay within one block's parameters (40 blocks), not the stack's.
    init = p["backbone_init"]
    assert init["output_bytes_per_device"] <= total / 8 * 1.05
    assert init["temp_bytes_per_device"] <= total / 40 * 1.25
    assert "temp_bytes_per_device" in p
