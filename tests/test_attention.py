

def test_parity_bfloat16_tables(capsys):
    from addinov3_jax.cli import main

    assert main(["parity", "dinov3", "--random", "tiny", "--image-size", "48,64",
                 "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "ours bfloat16 vs ours fp32" in out and "rel L2" in out and "FAIL" not in out
