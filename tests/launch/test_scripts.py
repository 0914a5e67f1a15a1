"""The launch scripts: valid bash, the commands they render in a fake SLURM allocation, and their
preemption trap (a signal to the batch shell reaches srun; a stopped run is requeued)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm_train.sbatch"
TORCHRUN = ROOT / "launch" / "torchrun_train.sh"


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN, ROOT / "launch" / "submit.sh"])
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


# -- the scripts run for real against stub SLURM / torchrun / ip binaries that record what they get

GRPO_SBATCH = ROOT / "launch" / "slurm_grpo.sbatch"
SUBMIT = ROOT / "launch" / "submit.sh"
RECORDED_ENV = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TRITON_CACHE_DIR", "LOG_DIR")


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def record(name: str) -> str:
    """A stub body that writes its arguments (one per line) and RECORDED_ENV to $STUB_OUT/name.*."""
    env = "".join(f'echo "{k}=${{{k}-<unset>}}" >> "$STUB_OUT/{name}.env"\n' for k in RECORDED_ENV)
    return f'printf "%s\\n" "$@" > "$STUB_OUT/{name}.args"\n{env}'


def stub_cluster(tmp_path, nodes=2, route="default via 10.0.0.1 dev ens5 proto dhcp metric 100"):
    """fake_slurm_env without the dry run: srun records its options and runs the command after
    them (as the task on the first node), torchrun and sbatch record, `ip` prints `route`."""
    env = fake_slurm_env(tmp_path, nodes)
    env.pop("MEGATRON_VLM_DRY_RUN")
    bin_dir, out = tmp_path / "bin", tmp_path / "stub"
    out.mkdir()
    stub(bin_dir, "srun", record("srun") + 'while [[ "$1" == --* ]]; do shift; done\n'
                                           'SLURMD_NODENAME=gpu-001 exec "$@"\n')
    stub(bin_dir, "torchrun", record("torchrun"))
    stub(bin_dir, "sbatch", record("sbatch") + '[ -d "$LOG_DIR" ] || { echo "no $LOG_DIR" >&2; exit 1; }\n')
    stub(bin_dir, "ip", f'[ "$*" = "-o route show default" ] && echo "{route}"\n' if route else "exit 1\n")
    env["STUB_OUT"] = str(out)
    return env, out


def recorded(out: Path, name: str) -> tuple[list[str], dict[str, str]]:
    args = (out / f"{name}.args").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (out / f"{name}.env").read_text().splitlines())
    return args, env


def run_train(env, *args):
    result = subprocess.run(["bash", str(SBATCH), "configs/qwen3_vl_30b_a3b.yaml", *args], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_srun_gets_cpus_per_task_and_torchrun_the_socket_defaults(tmp_path):
    env, out = stub_cluster(tmp_path)
    run_train(env, "train.steps=1")
    srun, srun_env = recorded(out, "srun")
    assert "--cpus-per-task=64" in srun  # the #SBATCH value when sbatch exported none
    assert f"--output={tmp_path}/logs/4242/node-%n.log" in srun and (tmp_path / "logs" / "4242").is_dir()
    torchrun, torchrun_env = recorded(out, "torchrun")
    assert torchrun[-2:] == ["runtime.gpus_per_node=8", "train.steps=1"]
    assert torchrun_env["NCCL_SOCKET_IFNAME"] == "^lo,docker" and torchrun_env["GLOO_SOCKET_IFNAME"] == "ens5"
    assert torchrun_env["TRITON_CACHE_DIR"] == "/tmp/triton-4242-gpu-001"  # expanded on the node
    env["SLURM_CPUS_PER_TASK"] = "48"  # sbatch --cpus-per-task=48
    run_train(env)
    assert "--cpus-per-task=48" in recorded(out, "srun")[0]


@pytest.mark.parametrize("overrides, nccl, gloo", [
    (dict(SOCKET_IFNAME="ib0"), "ib0", "ib0"),
    (dict(NCCL_SOCKET_IFNAME="=eth1"), "=eth1", "ens5"),
    (dict(SOCKET_IFNAME="ib0", GLOO_SOCKET_IFNAME="eth0"), "ib0", "eth0"),
])
def test_socket_interfaces_can_be_overridden(tmp_path, overrides, nccl, gloo):
    env, out = stub_cluster(tmp_path)
    run_train(dict(env, **overrides))
    _, torchrun_env = recorded(out, "torchrun")
    assert (torchrun_env["NCCL_SOCKET_IFNAME"], torchrun_env["GLOO_SOCKET_IFNAME"]) == (nccl, gloo)


def test_no_default_route_leaves_gloo_unset_and_says_so(tmp_path):
    env, out = stub_cluster(tmp_path, route="")  # `ip` finds no default route
    result = run_train(env)
    assert recorded(out, "torchrun")[1]["GLOO_SOCKET_IFNAME"] == "<unset>"  # never "" (gloo fails)
    assert "set GLOO_SOCKET_IFNAME" in result.stderr


def test_grpo_wrapper_reaches_srun_with_the_same_settings(tmp_path):
    env, out = stub_cluster(tmp_path)
    env["MEGATRON_VLM_ROOT"] = str(ROOT)
    result = subprocess.run(["bash", str(GRPO_SBATCH)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--cpus-per-task=64" in recorded(out, "srun")[0]
    assert recorded(out, "torchrun")[1]["GLOO_SOCKET_IFNAME"] == "ens5"


def test_job_log_needs_no_directory_and_submit_creates_one(tmp_path):
    for script in (SBATCH, GRPO_SBATCH):  # opened by SLURM before the script runs: no directory
        directive = next(l for l in script.read_text().splitlines() if l.startswith("#SBATCH --output="))
        assert "/" not in directive, directive
    env, out = stub_cluster(tmp_path)
    env["LOG_DIR"] = str(tmp_path / "job-logs")
    result = subprocess.run(["bash", str(SUBMIT), "--nodes=4", str(SBATCH), "c.yaml", "a.b=1"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # the stub sbatch checks LOG_DIR exists
    args, sbatch_env = recorded(out, "sbatch")
    assert args == [f"--output={tmp_path}/job-logs/%x-%j.out", "--nodes=4", str(SBATCH), "c.yaml", "a.b=1"]
    assert sbatch_env["LOG_DIR"] == str(tmp_path / "job-logs")  # the job's node logs go there too


# -- preemption: the batch shell forwards USR1 / TERM to srun and requeues a stopped run

def test_both_scripts_ask_for_the_signal_and_requeue():
    for script in (SBATCH, GRPO_SBATCH):
        directives = [l for l in script.read_text().splitlines() if l.startswith("#SBATCH ")]
        for expected in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert expected in directives, f"{expected} missing from {script.name}"


# A srun that records its pid, its arguments and what reached it; on USR1 / TERM it exits 75 as the
# ranks do after a save. STUB_EXIT makes it exit at once; STUB_MARKER makes it leave the ranks'
# preemption marker first (a time-budget stop, seen through torchrun as exit 1).
PREEMPTIBLE_SRUN = """echo $$ > "$STUB_OUT/srun.pid"
printf "%s\\n" "$@" > "$STUB_OUT/srun.args"
echo "$PET_SIGNALS_TO_HANDLE $MEGATRON_VLM_PREEMPTED_FILE" > "$STUB_OUT/srun.env"
on_signal() { echo "$1" >> "$STUB_OUT/srun.signals"; exit 75; }
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
[ -z "${STUB_MARKER:-}" ] || echo "time budget" > "$MEGATRON_VLM_PREEMPTED_FILE"
[ -z "${STUB_EXIT:-}" ] || exit "$STUB_EXIT"
while :; do sleep 0.05; done
"""


def preemptible_cluster(tmp_path, requeue_ok=True, **env_overrides):
    env, out = stub_cluster(tmp_path)
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "srun", PREEMPTIBLE_SRUN)
    requeue = f'echo "$2" > "$STUB_OUT/requeue"; exit {0 if requeue_ok else 1}'
    stub(bin_dir, "scontrol", 'case "$1" in\n  show) printf "gpu-001\\ngpu-002\\n" ;;\n'
                              f'  requeue) {requeue} ;;\n  *) exit 1 ;;\nesac\n')
    env.update(env_overrides)
    batch = subprocess.Popen(["bash", str(SBATCH), "configs/qwen3_vl_30b_a3b.yaml"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return batch, out


def wait_for_srun(batch, out: Path) -> None:
    for _ in range(400):
        if (out / "srun.pid").is_file() and (out / "srun.pid").read_text().strip():
            return
        assert batch.poll() is None, batch.communicate()
        time.sleep(0.025)
    raise AssertionError("the stub srun did not start")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_reaches_srun_and_the_job_is_requeued(tmp_path, sig):
    batch, out = preemptible_cluster(tmp_path)
    wait_for_srun(batch, out)
    batch.send_signal(sig)
    _, err = batch.communicate(timeout=30)
    assert batch.returncode == 0, err
    assert (out / "srun.signals").read_text().split() == [sig.name.removeprefix("SIG")]
    assert (out / "requeue").read_text().strip() == "4242" and "requeueing" in err
    args = (out / "srun.args").read_text().splitlines()
    assert args[args.index("--config") + 2:args.index("--config") + 4] == ["--resume", "auto"]
    handled, marker = (out / "srun.env").read_text().split()
    assert "SIGUSR1" in handled.split(",") and marker == f"{tmp_path}/logs/4242/preempted"


def test_a_time_budget_stop_through_torchrun_is_requeued_too(tmp_path):
    batch, out = preemptible_cluster(tmp_path, STUB_EXIT="1", STUB_MARKER="1")
    _, err = batch.communicate(timeout=30)
    assert batch.returncode == 0 and (out / "requeue").read_text().strip() == "4242", err


def test_a_failed_run_is_not_requeued(tmp_path):
    (tmp_path / "logs" / "4242").mkdir(parents=True)
    (tmp_path / "logs" / "4242" / "preempted").write_text("signal\n")  # the previous attempt's
    batch, out = preemptible_cluster(tmp_path, STUB_EXIT="3")
    _, err = batch.communicate(timeout=30)
    assert batch.returncode == 3, err
    assert not (out / "requeue").exists() and not (out / "srun.signals").exists()


def test_a_refused_requeue_returns_the_steps_exit_code(tmp_path):
    batch, out = preemptible_cluster(tmp_path, requeue_ok=False)
    wait_for_srun(batch, out)
    batch.send_signal(signal.SIGUSR1)
    _, err = batch.communicate(timeout=30)
    assert batch.returncode == 75 and "requeue refused" in err
