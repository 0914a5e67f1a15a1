"""The preemption flag and time budget: signals set a flag, every rank agrees, save_by parses."""
import datetime
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_vlm.parallel.preemption import (EXIT_PREEMPTED, Preemption, parse_save_by,
                                              record_preemption, resolve_save_by,
                                              slurm_job_end_time)
from tests.utils import run_worker

CPU = torch.device("cpu")
WORKER = str(Path(__file__).with_name("preemption_worker.py"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_only_sets_the_flag(sig):
    before = signal.getsignal(sig)
    with Preemption(CPU) as preemption:
        assert preemption.should_stop(1.0, 1.0) is None
        os.kill(os.getpid(), sig)  # the handler runs before the next bytecode of this thread
        assert preemption.signalled and preemption.received == sig
        assert preemption.should_stop(1.0, 1.0) == "signal"
    assert signal.getsignal(sig) is before  # restored


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])
def test_sigint_is_left_as_it_was(inherited):
    """Ctrl-C still interrupts where it would have; where the process was started with SIGINT
    ignored (a background job of a shell without job control) it stays ignored."""
    outside = signal.signal(signal.SIGINT, inherited)
    try:
        with Preemption(CPU) as preemption:
            assert signal.getsignal(signal.SIGINT) is inherited
            if inherited is signal.default_int_handler:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
            assert not preemption.signalled
        assert signal.getsignal(signal.SIGINT) is inherited
    finally:
        signal.signal(signal.SIGINT, outside)


def test_deadline_with_a_fake_clock():
    now = [1000.0]
    preemption = Preemption(CPU, save_by=1100.0, safety=2.0, clock=lambda: now[0])
    assert preemption.should_stop(step_seconds=20, save_seconds=29) is None  # 1000 + 2 * 49 = 1098
    now[0] = 1003.0  # 1003 + 98 > 1100
    assert preemption.deadline_near(20, 29) and preemption.should_stop(20, 29) == "time budget"
    preemption.received = signal.SIGTERM
    assert preemption.should_stop(20, 29) == "signal"  # the signal is named first
    assert Preemption(CPU, clock=lambda: 1e12).should_stop(1e6, 1e6) is None  # no budget
    with pytest.raises(ValueError, match="safety factor must be >= 1"):
        Preemption(CPU, safety=0.5)


@pytest.mark.dist
def test_every_rank_stops_when_one_is_signalled(tmp_path):
    report = run_worker(WORKER, tmp_path, nproc=2, timeout=120)
    for answers in report["per_rank"]:
        assert answers == {"quiet": None, "rank 1 signalled": "signal",
                           "rank 0 near the deadline": "time budget"}


def test_parse_save_by():
    start = 1_700_000_000.0
    assert parse_save_by(None, start) is None and parse_save_by("", start) is None
    assert parse_save_by(3600, start) == start + 3600
    assert parse_save_by("90.5", start) == start + 90.5
    utc = datetime.datetime(2026, 12, 2, 14, 0, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_save_by("2026-12-02T14:00:00Z", start) == utc
    assert parse_save_by("2026-12-02T15:00:00+01:00", start) == utc
    local = datetime.datetime(2026, 12, 2, 14, 0).timestamp()
    assert parse_save_by("2026-12-02T14:00:00", start) == local  # no offset: local time, as SLURM


@pytest.mark.parametrize("bad, message", [
    (0, "positive number of seconds"), (-5, "positive number of seconds"),
    ("nan", "positive number of seconds"), (True, "seconds from the start or an ISO-8601 time"),
    ("tomorrow", "seconds from the start or an ISO-8601 time"),
    ("2026-13-02T14:00", "seconds from the start or an ISO-8601 time"),
])
def test_parse_save_by_names_the_field(bad, message):
    with pytest.raises(ValueError, match=f"train.save_by must be .*{message}.*got {bad!r}"):
        parse_save_by(bad, 0.0)


def fake_run(outputs: dict):
    """A subprocess.run stand-in answering each command (by name) with its output, or raising."""
    def run(command, **kwargs):
        out = outputs[command[0]]
        if isinstance(out, Exception):
            raise out
        return subprocess.CompletedProcess(command, 0, stdout=out, stderr="")
    return run


def test_slurm_job_end_time():
    assert slurm_job_end_time({"SLURM_JOB_END_TIME": "1764684000"}) == 1764684000.0
    assert slurm_job_end_time({}) is None  # not in a SLURM job: nothing is run
    job = {"SLURM_JOB_ID": "42"}
    end = datetime.datetime(2026, 12, 2, 14, 0).timestamp()
    assert slurm_job_end_time(job, fake_run({"squeue": "2026-12-02T14:00:00\n"})) == end
    scontrol = "JobId=42 JobName=x\n   StartTime=2026-12-02T10:00:00 EndTime=2026-12-02T14:00:00 Deadline=N/A\n"
    no_squeue = fake_run({"squeue": FileNotFoundError("squeue"), "scontrol": scontrol})
    assert slurm_job_end_time(job, no_squeue) == end
    unknown = fake_run({"squeue": "N/A\n", "scontrol": "EndTime=Unknown"})
    assert slurm_job_end_time(job, unknown) is None
    timeout = fake_run({"squeue": subprocess.TimeoutExpired("squeue", 10), "scontrol": ""})
    assert slurm_job_end_time(job, timeout) is None


def test_resolve_save_by_prefers_the_config():
    env = {"SLURM_JOB_END_TIME": "5000"}
    assert resolve_save_by(100, 1000.0, env) == 1100.0
    assert resolve_save_by(None, 1000.0, env) == 5000.0
    assert resolve_save_by(None, 1000.0, {}) is None


def test_record_preemption_writes_the_marker(tmp_path):
    marker = tmp_path / "preempted"
    record_preemption("signal", {})  # unset: nothing written, no error
    record_preemption("time budget", {"MEGATRON_VLM_PREEMPTED_FILE": str(marker)})
    assert marker.read_text() == "time budget\n"
    assert EXIT_PREEMPTED == 75  # the sbatch scripts compare against the literal
