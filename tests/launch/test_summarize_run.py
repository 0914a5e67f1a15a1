"""launch/summarize_run.py --same-as: two runs trained alike when every (stage, step) row has the
same values with timings and evaluations aside; the first difference is named."""
import importlib.util
import json
from pathlib import Path

from megatron_vlm.report import read_rows

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("summarize_run", ROOT / "launch" / "summarize_run.py")
summarize_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_run)


def run_dir(tmp_path, name, rows):
    path = tmp_path / name
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(loss_at_2=0.5, eval_at_1=True, seconds=1.0):
    out = [{"stage": "init", "step": 0, "eval_accuracy": 0.1, "eval_seconds": 20.0}]
    for step, loss in ((1, 0.9), (2, loss_at_2)):
        row = {"stage": "sft", "step": step, "loss": loss, "grad_norm": 2.0, "step_seconds": seconds,
               "time_update": seconds / 2, "train_tokens_per_s": 100 / seconds}
        if step == 2 or eval_at_1:
            row.update(eval_accuracy=0.2 * step, eval_seconds=20.0 * seconds)
        out.append(row)
    return out


def test_cadence_and_timings_aside_the_same_training_is_the_same(tmp_path, capsys):
    a = run_dir(tmp_path, "a", rows())
    b = run_dir(tmp_path, "b", rows(eval_at_1=False, seconds=3.0))
    assert summarize_run.first_difference(read_rows(b), read_rows(a)) is None
    assert summarize_run.main([str(b), "--same-as", str(a)]) == 0
    out = capsys.readouterr().out
    assert "same training as" in out and "yes, all 3 rows" in out
    assert "evaluations: 2, 80 s; steps: 6 s" in out  # b: init and step 2 (20 s + 60 s), two 3 s steps


def test_a_changed_training_value_is_named_and_fails(tmp_path, capsys):
    a = run_dir(tmp_path, "a", rows())
    b = run_dir(tmp_path, "b", rows(loss_at_2=0.5000001))
    assert summarize_run.first_difference(read_rows(b), read_rows(a)) == \
        "sft step 2: loss 0.5000001 against 0.5"
    assert summarize_run.main([str(b), "--same-as", str(a)]) == 1
    assert "no, sft step 2: loss" in capsys.readouterr().out


def test_missing_or_extra_rows_are_named(tmp_path):
    full = rows()
    assert summarize_run.first_difference(full[:-1], full) == "other rows: missing [('sft', 2)], extra []"
    extra = full + [{"stage": "sft", "step": 3, "loss": 0.1}]
    assert summarize_run.first_difference(extra, full) == "other rows: missing [], extra [('sft', 3)]"
    assert summarize_run.first_difference(full[::-1], full) == "rows in another order"
