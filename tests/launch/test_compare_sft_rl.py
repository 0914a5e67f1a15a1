"""launch/compare_sft_rl.py summarises runs it did not have to train: two arms x two seeds of
hand-written metrics rows give the table's means and spreads, the training-seconds axis and a plot."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compare_sft_rl", ROOT / "launch" / "compare_sft_rl.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def rows(max_end: float, seconds: float, grpo_max: float | None = None) -> list[dict]:
    def evaluation(stage, step, overall, mx):
        return {"stage": stage, "step": step, "eval_accuracy": overall, "eval_strict_accuracy": overall / 2,
                "eval/accuracy/sum": 0.6, "eval/strict_accuracy/sum": 0.3, "eval/samples/sum": 4,
                "eval/accuracy/max": mx, "eval/strict_accuracy/max": 0.0, "eval/samples/max": 4,
                "eval/accuracy/max/larger=left": mx, "eval/samples/max/larger=left": 2,
                "eval/accuracy/max/larger=right": mx / 2, "eval/samples/max/larger=right": 2}
    sft = [evaluation("init", 0, 0.1, 0.0),
           {"stage": "sft", "step": 1, "step_seconds": seconds / 2},
           {"stage": "sft", "step": 2, "step_seconds": seconds / 2, **evaluation("sft", 2, 0.4, max_end)}]
    if grpo_max is None:
        return sft
    return sft[:-1] + [{**sft[-1], "step_seconds": seconds / 4},  # SFT then GRPO: the same total seconds
                       {"stage": "grpo", "step": 1, "step_seconds": seconds / 4, **evaluation("grpo", 1, 0.5, grpo_max)}]


def write_run(directory: Path, run_rows: list[dict], wall: float) -> None:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run_rows))
    (directory.parent / f"{directory.name}.wall").write_text(f"{wall}\n")


def test_the_table_and_plot_from_finished_runs(tmp_path):
    for seed, (grpo_max, sft_max) in {1: (0.5, 0.0), 2: (0.3, 0.1)}.items():
        write_run(tmp_path / "runs" / f"seed_{seed}" / "sft_grpo", rows(0.1, 100.0, grpo_max), 300.0)
        write_run(tmp_path / "runs" / f"seed_{seed}" / "sft_only", rows(sft_max, 90.0), 250.0)
    compare.main(["--seeds", "1", "2", "--reuse", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
                  "--commit", "abc1234"])
    text = (tmp_path / "docs" / "digits_kinds.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    # max has no demonstration in the main job: the headline row, first after the overall rows
    assert "40.0% ± 14.1 pts (50.0% / 30.0%)" in lines["**max** (no demonstrations)"]
    assert "5.0% ± 7.1 pts (0.0% / 10.0%)" in lines["**max** (no demonstrations)"]
    assert "max, right digit larger" in lines and "20.0% ± 7.1 pts (25.0% / 15.0%)" in lines["max, right digit larger"]
    assert lines["max, weaker side (lower of the two)"] == lines["max, right digit larger"].replace(
        "max, right digit larger", "max, weaker side (lower of the two)")  # right = left / 2 in these rows
    # third column: the main job where its GRPO stage starts (the last SFT evaluation: max 10% at both seeds)
    assert lines["**max** (no demonstrations)"].rstrip(" |").endswith("10.0% ± 0.0 pts (10.0% / 10.0%)")
    assert lines["wall seconds"].rstrip(" |").endswith("—")
    assert "75 ± 0 (75 / 75)" in lines["training seconds"]
    assert "100 ± 0 (100 / 100)" in lines["training seconds"] and "250 ± 0 (250 / 250)" in lines["wall seconds"]
    assert "Commit abc1234" in text
    assert (tmp_path / "docs" / "digits_kinds.png").stat().st_size > 0
    summary = json.loads((tmp_path / "docs" / "digits_kinds.json").read_text())
    assert summary["no_demonstrations"] == ["max"] and summary["kinds"] == ["max", "sum"]
    assert [p["seconds"] for p in summary["runs"]["sft_grpo"]["1"]["curve"]] == [0.0, 75.0, 100.0]
    assert summary["main_job_after_sft"]["1"]["max"] == 0.1


def test_mean_and_spread():
    assert compare.mean_spread([0.5, 0.3]) == (pytest.approx(0.4), pytest.approx(0.1414, abs=1e-4))
    assert compare.mean_spread([0.5]) == (0.5, 0.0)
