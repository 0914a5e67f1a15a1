"""The benchmark script runs end to end at a toy size (its numbers are not checked: a script, not a timed test)."""
import json

from kernels.bench.__main__ import main


def test_bench_main_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--tokens", "64", "--vocab", "512", "--hidden", "32", "--reps", "1", "--warmup", "0",
               "--providers", "naive,fused_torch", "--pack-samples", "256", "--pack-dp", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cpu/naive" in printed and "fill/budget" in printed
    result = json.loads(out.read_text())
    assert [r["provider"] for r in result["head"]] == ["naive", "fused_torch"]
    assert all("error" not in r for r in result["head"])
    assert {r["scenario"] for r in result["packing"]} == {"text", "text+images"}
