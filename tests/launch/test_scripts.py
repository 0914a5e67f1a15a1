"""The launch scripts: valid bash, and the commands they render in a fake SLURM allocation."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm_train.sbatch"
TORCHRUN = ROOT / "launch" / "torchrun_train.sh"


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN])
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def fake_slurm_env(tmp_path, nodes):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # The real `scontrol show hostnames` expands the node list, one host per line.
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
                        + "".join(f"echo gpu-{i:03d}\n" for i in range(1, nodes + 1)))
    scontrol.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST=f"gpu-[001-{nodes:03d}]", SLURM_NNODES=str(nodes),
                MEGATRON_VLM_DRY_RUN="1", LOG_DIR=str(tmp_path / "logs"))


def test_sbatch_renders_multi_node_torchrun(tmp_path):
    env = fake_slurm_env(tmp_path, nodes=4)
    out = subprocess.run(["bash", str(SBATCH), "configs/qwen3_vl_30b_a3b.yaml", "train.steps=10"],
                         env=env, capture_output=True, text=True, check=True).stdout
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    for expected in ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                     "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu-001:29500", "--rdzv-id=4242", "megatron_vlm.cli train",
                     "configs/qwen3_vl_30b_a3b.yaml", "runtime.nodes=4", "train.steps=10",
                     "TRITON_CACHE_DIR=/tmp/triton-\\$SLURM_JOB_ID-\\$SLURMD_NODENAME",
                     f"--output={tmp_path}/logs/4242/node-%n.log"]:
        assert expected in srun, f"{expected!r} missing from: {srun}"
    assert "head gpu-001:29500" in out


def test_sbatch_outside_allocation_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    result = subprocess.run(["bash", str(SBATCH), "c.yaml"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "SLURM_JOB_ID" in result.stderr


def test_torchrun_script_renders_single_node(tmp_path):
    env = dict(os.environ, MEGATRON_VLM_DRY_RUN="1", NPROC="8", MASTER_PORT="29511")
    out = subprocess.run(["bash", str(TORCHRUN), "configs/lm_demo.yaml", "parallel.tp=2"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[:4] == ["torchrun", "--standalone", "--nproc-per-node=8", "--master-port=29511"]
    assert "megatron_vlm.cli train --config configs/lm_demo.yaml parallel.tp=2" in out
