"""The autotune configs compile for sm_90 (H100 / H200) as chosen: wgmma, pipelined loads, no
register spills in bf16 (kernels.bench.compile; no GPU needed, Triton's bundled ptxas)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _compile(tmp_path, *args):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    done = subprocess.run([sys.executable, "-m", "kernels.bench.compile", "--json", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def _check_tensor_core_path(records):
    assert records, "the compile script reported no kernel"
    for r in records:
        assert r["mma"] == "wgmma" and r["pipelined"], r
        assert r["spill_bytes"] in (0, None), r  # None: no ptxas in this Triton build
        assert r["shared_bytes"] <= 227 * 1024, r  # an H100 / H200 SM's shared memory per block


def test_first_config_of_each_head_kernel_compiles_to_wgmma_without_spills(tmp_path):
    records = _compile(tmp_path, "--configs", "1")
    assert {r["kernel"] for r in records} == {"_fwd_kernel", "_dlogits_kernel"}
    _check_tensor_core_path(records)


@pytest.mark.slow
def test_every_config_compiles_to_wgmma_without_spills(tmp_path):
    _check_tensor_core_path(_compile(tmp_path))
