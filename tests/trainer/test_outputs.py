"""A run never silently writes over another run's outputs (trainer/run_log.py): a fresh run into an
out_dir holding metrics, checkpoints or an export refuses before anything is built unless told to
--resume or --overwrite; a resume cuts the append-only files back to its checkpoint."""
import json
from pathlib import Path

import pytest

from megatron_vlm.cli import main
from megatron_vlm.trainer.run_log import (METRICS, MetricsLog, refuse_foreign_outputs, remove_outputs,
                                          truncate_bytes)

ROOT = Path(__file__).resolve().parents[2]


def previous_run(out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"stage": "sft", "step": 1, "loss": 1.0}) + "\n"
    (out / METRICS).write_text(text)
    (out / "hf_export").mkdir()
    return text


@pytest.mark.parametrize("config, extra", [
    ("digits_demo.yaml", ["runtime.nproc=1", "parallel.ep=1"]),
    ("lm_demo.yaml", ["runtime.nproc=1", "parallel.ep=1", "parallel.tp=1"]),
])
@pytest.mark.parametrize("flags", [[], ["--resume", "auto"]])
def test_a_second_run_into_the_same_out_dir_refuses_and_keeps_the_first(tmp_path, capsys, config, extra, flags):
    """(The LM demo keeps no checkpoints: it refuses --resume itself, naming --overwrite.)"""
    out = tmp_path / "run"
    before = previous_run(out)
    code = main(["train", "--config", str(ROOT / "configs" / config), *flags, f"train.out_dir={out}", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and ("--overwrite" in err)
    assert (out / METRICS).read_text() == before and (out / "hf_export").is_dir()


def test_refusal_names_what_is_there(tmp_path):
    previous_run(tmp_path)
    with pytest.raises(FileExistsError, match=r"metrics.jsonl, hf_export"):
        refuse_foreign_outputs(tmp_path)
    remove_outputs(tmp_path)
    refuse_foreign_outputs(tmp_path)  # nothing left to refuse
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_log_keeps_the_rows_before_its_checkpoint_and_appends(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in range(1, 6):
        log({"stage": "sft", "step": step})
    log.close()
    log = MetricsLog(tmp_path, enabled=True, resume_rows=3)  # the checkpoint was after row 3
    log({"stage": "sft", "step": 4, "again": True})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["again"]


def test_a_log_shorter_than_its_checkpoint_is_refused(tmp_path):
    (tmp_path / METRICS).write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match="holds 1 rows but the checkpoint was written after row 2"):
        MetricsLog(tmp_path, enabled=True, resume_rows=2)


def test_rejection_file_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "rejection_sft.jsonl"
    path.write_text("a\nb\nc\n")
    truncate_bytes(path, 4)
    assert path.read_text() == "a\nb\n"
