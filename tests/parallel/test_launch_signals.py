"""launch_local under signals: a SIGTERM / SIGUSR1 reaches every rank and the launcher reports the
ranks' exit code; a rank that ignores it is killed after the grace period; a SIGKILLed launcher
takes its ranks with it. The launcher runs in its own process, as `megatron-vlm train` would."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vlm.parallel.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("signal_worker.py"))
LAUNCHER = """
import json, sys
from megatron_vlm.parallel.launch import launch_local
result = launch_local([{worker!r}, {out!r}, {mode!r}], nproc=2, timeout=120, grace_s={grace})
print(json.dumps(dict(codes=result.returncodes, signalled=result.signalled, timed_out=result.timed_out)))
sys.exit(result.exit_code)
"""


def start_launcher(tmp_path, mode="preempt", grace=30) -> subprocess.Popen:
    code = LAUNCHER.format(worker=WORKER, out=str(tmp_path), mode=mode, grace=grace)
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    pid_files = [tmp_path / "pid.0", tmp_path / "pid.1"]
    deadline = time.monotonic() + 60
    while not all(f.is_file() and f.read_text() for f in pid_files):
        assert launcher.poll() is None and time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.05)
    return launcher


def rank_pids(tmp_path) -> list[int]:
    return [int((tmp_path / f"pid.{rank}").read_text()) for rank in range(2)]


def alive(pid: int) -> bool:
    """A zombie (exited, not reaped yet by whoever adopted it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_reaches_every_rank_and_its_exit_code_comes_back(tmp_path, sig):
    launcher = start_launcher(tmp_path)
    launcher.send_signal(sig)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == EXIT_PREEMPTED, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report == dict(codes=[EXIT_PREEMPTED] * 2, signalled=sig, timed_out=False)
    assert [(tmp_path / f"signal.{r}").read_text() for r in range(2)] == [sig.name] * 2
    assert wait_gone(rank_pids(tmp_path)) == []


def test_a_rank_that_ignores_the_signal_is_killed_after_the_grace_period(tmp_path):
    launcher = start_launcher(tmp_path, mode="stubborn", grace=1)
    start = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["codes"] == [-signal.SIGKILL] * 2 and report["signalled"] == signal.SIGTERM
    assert launcher.returncode == 1 and time.monotonic() - start < 20
    assert wait_gone(rank_pids(tmp_path)) == []


def test_a_killed_launcher_takes_its_ranks_with_it(tmp_path):
    launcher = start_launcher(tmp_path)
    pids = rank_pids(tmp_path)
    launcher.kill()
    launcher.wait(timeout=10)
    assert wait_gone(pids) == [], "ranks outlived a SIGKILLed launcher"
    assert not any((tmp_path / f"signal.{r}").exists() for r in range(2))  # killed, not signalled


@pytest.mark.parametrize("codes, expected", [([EXIT_PREEMPTED] * 2, EXIT_PREEMPTED), ([0, 0], 0),
                                             ([EXIT_PREEMPTED, -9], 1), ([3, 3], 3)])
def test_train_returns_the_ranks_exit_code(monkeypatch, codes, expected):
    from megatron_vlm.cli import main
    from megatron_vlm.parallel import launch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch, "launch_local",
                        lambda *a, **k: launch.LaunchResult(codes, ["", ""], False, signal.SIGTERM))
    assert main(["train", "--config", "configs/lm_demo.yaml", "runtime.nproc=2"]) == expected
