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


def test_gpu_table_shows_tflops_share_of_the_measured_matmul_and_the_tuned_configs():
    # The CUDA-only columns, from records shaped like a GPU run's (no GPU here to produce them).
    from kernels.bench.__main__ import format_head_table
    base = dict(T=4096, V=32768, H=2048, forward_s=0.01, backward_s=0.01, full_s=0.02, full_cpu_s=0.02,
                peak_extra_mib=100.0)
    records = [dict(base, provider="naive", tflops=40.0),
               dict(base, provider="triton", tflops=400.0, tuned={"_fwd_kernel": {"BLOCK_T": 128}}),
               dict(provider="naive", T=65536, V=151936, H=4096, error="CUDA out of memory")]
    table = format_head_table(records, peak_tflops=800.0)
    assert "of bf16 mm" in table and "50.0%" in table and "5.0%" in table
    assert "T=4096 V=32768 H=2048: _fwd_kernel {'BLOCK_T': 128}" in table
    assert "error: CUDA out of memory" in table
