"""The operator's view (trainer/loggers.py): metric names grouped by prefix, every row fanned out to
TensorBoard and W&B (offline) under the same names, progress as plain lines off a terminal and a
bar on one, and the per-stage run summary."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.trainer.loggers import Progress, metric_name, scalars, summary_table
from megatron_vlm.trainer.run_log import METRICS

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {"stage": "init", "step": 0, "eval_accuracy": 0.25, "eval_samples": 8},
    {"stage": "sft", "step": 1, "loss": 2.0, "tokens": 100, "grad_norm": 1.5, "step_seconds": 0.5},
    {"stage": "sft", "step": 2, "loss": 1.5, "tokens": 100, "step_seconds": 0.5, "eval_accuracy": 0.5},
    {"stage": "grpo", "step": 1, "loss": 0.1, "reward": 0.4, "reward/failures": 1.0, "reward/timeouts": 1.0,
     "train_tokens": 300, "time_rollout": 1.0, "time_update": 0.5, "sync_logprob_max_abs": 1e-6,
     "step_seconds": 1.5, "eval_accuracy": 0.75, "finite": True},
]


@pytest.mark.parametrize("key, name", [
    ("time_update", "time/update"), ("step_seconds", "time/step"), ("sync_logprob_max_abs", "sync/logprob_max_abs"),
    ("eval_accuracy", "eval/accuracy"), ("reward", "reward/mean"), ("reward_shaped", "reward/shaped"),
    ("reward/digits/raw_mean", "reward/digits/raw_mean"), ("loss", "train/loss"), ("grad_norm", "train/grad_norm"),
])
def test_metric_names_are_grouped_by_prefix(key, name):
    assert metric_name(key) == name


def test_scalars_keep_finite_numbers_only():
    values = scalars({"stage": "grpo", "step": 3, "loss": 1.0, "finite": True, "kl": float("nan")})
    assert values == {"train/loss": 1.0}


def test_every_row_reaches_tensorboard_and_wandb_under_the_same_names(tmp_path):
    """In a process of its own, as a run's rank 0 (W&B's service keeps state per process)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = (f"import io, json\nfrom megatron_vlm.trainer.run_log import MetricsLog\n"
              f"log = MetricsLog(__import__('pathlib').Path({str(tmp_path)!r}), True, "
              f"loggers=['jsonl', 'tensorboard', 'wandb'], config={{'seed': 1}}, stream=io.StringIO())\n"
              f"for row in json.loads({json.dumps(json.dumps(ROWS))}):\n    log(row)\nlog.close()\n")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()] == ROWS
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    expected = {}
    for step, row in enumerate(ROWS):
        for name, value in scalars(row).items():
            expected.setdefault(name, []).append((step, value))
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(name)] == points, name
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run W&B writes offline, to sync later
    history = _wandb_history(runs[0])
    assert set(history) == set(expected)
    for name, points in expected.items():
        assert history[name] == [pytest.approx(v) for _, v in points], name


def _wandb_history(run_dir) -> dict:
    """The logged values of an offline W&B run, read back from its .wandb file: W&B's record log
    (a LevelDB-style log: a 7-byte header, 32 KiB blocks of records, each a crc32, a uint16 length
    and a type: full, first, middle, last) of `wandb_internal_pb2.Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # the block's tail is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            offset += room
            continue
        payload, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        pending += payload
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    history: dict = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append(json.loads(item.value_json))
    return history


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    progress = Progress(stream)
    progress.stage("sft", 0, 2, 2, 1)
    for row in ROWS[1:3]:
        progress.row(row)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "stage 1/2: sft, steps 1..2"
    assert lines[1] == "stage=sft step=1 loss=2 step_seconds=0.5"
    assert lines[2].startswith("stage=sft step=2 loss=1.5 eval_accuracy=0.5")
    assert "\r" not in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar_with_the_stage_numbers():
    stream = Terminal()
    progress = Progress(stream)
    progress.stage("grpo", 1, 2, 4, 1)
    progress.row(ROWS[3])
    progress.close()
    text = stream.getvalue()
    assert "[2/2] grpo" in text and "1/4" in text and "reward=0.4" in text
    assert "grpo step 1: eval accuracy 0.75" in text


KINDS_ROW = {"stage": "grpo", "step": 40, "step_seconds": 5.0, "eval_accuracy": 0.5, "eval_strict_accuracy": 0.25,
             "eval/accuracy/sum": 0.75, "eval/accuracy/max": 0.25, "eval/accuracy/max/larger=left": 0.5}


def test_evaluation_lines_show_strict_and_per_kind_accuracy():
    stream = io.StringIO()
    Progress(stream).row(KINDS_ROW)
    assert stream.getvalue().rstrip().endswith("eval_accuracy=0.5 step_seconds=5 (strict 0.25; max 0.25, sum 0.75)")
    table = summary_table([ROWS[0], KINDS_ROW]).splitlines()
    assert table[2].split() == ["eval", "end", "(strict", "0.25;", "max", "0.25,", "sum", "0.75)"]
    assert metric_name("eval/accuracy/max") == "eval/accuracy/max" and metric_name("eval_strict_accuracy") == \
        "eval/strict_accuracy"
    assert len(summary_table(ROWS).splitlines()) == 3  # rows without kinds: no extra line


def test_run_summary_per_stage():
    table = summary_table(ROWS).splitlines()
    assert table[0].split()[:2] == ["stage", "steps"]
    sft, grpo = table[1].split(), table[2].split()
    assert sft[:5] == ["sft", "2", "1.0", "0.250", "0.500"] and sft[5] == "200"  # 200 tokens in 1 s
    assert grpo[:8] == ["grpo", "1", "1.5", "0.500", "0.750", "200", "1", "1"]
    assert "rollout 1.0, update 0.5" in table[2]
