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


def test_equal_time_steps_buys_the_main_jobs_seconds_at_its_sft_step_time():
    main_rows = ([{"stage": "init", "step": 0}] + [{"stage": "sft", "step": i, "step_seconds": s}
                                                    for i, s in enumerate([0.5, 0.7, 0.6], 1)]
                 + [{"stage": "grpo", "step": i, "step_seconds": 6.0} for i in (1, 2)])
    assert compare.equal_time_steps(main_rows) == 23  # (1.8 + 12) s / 0.6 s = 23
    with pytest.raises(ValueError, match="no timed step of its first stage \\('sft'\\)"):
        compare.equal_time_steps([{"stage": "init", "step": 0}, {"stage": "sft", "step": 1}])


def test_the_baseline_gets_the_steps_and_keeps_its_number_of_evaluations():
    from megatron_vlm.config import load_config

    baseline = load_config(ROOT / compare.ARMS["sft_only"], [])
    evaluations = baseline.stages[0].steps // baseline.eval.every
    overrides = compare.baseline_overrides(baseline, 1302)
    cfg = load_config(ROOT / compare.ARMS["sft_only"], overrides)
    assert [(s.kind, s.steps, s.batch_size) for s in cfg.stages] == [("sft", 1302, baseline.stages[0].batch_size)]
    assert cfg.eval.every == round(1302 / evaluations)
    # a stage's own cadence counts and is replaced by eval.every, so the evaluations stay as many
    own = compare.baseline_overrides(load_config(ROOT / compare.ARMS["sft_only"], [
        "stages=[{kind: sft, steps: 1200, batch_size: 32, eval_every: 300}]"]), 2400)
    cfg = load_config(ROOT / compare.ARMS["sft_only"], own)
    assert cfg.stages[0].eval_every is None and cfg.eval.every == 600
    with pytest.raises(ValueError, match="the baseline must be one SFT stage, got \\['sft', 'grpo'\\]"):
        compare.baseline_overrides(load_config(ROOT / compare.ARMS["sft_grpo"], []), 10)


def finished_main_run(tmp_path, seed, extra=(), steps=None):
    """A run directory as `train` leaves it: the last checkpoint's config.json and a metrics row per step."""
    from megatron_vlm.config import load_config, to_dict

    run = tmp_path / f"main_{seed}"
    paths = [f"vlm.assets={tmp_path / 'assets'}", f"train.out_dir={run}"]
    cfg = load_config(ROOT / compare.ARMS["sft_grpo"], [f"runtime.seed={seed}", *paths, *extra])
    tag = "step0000480-grpo1"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag + "\n")
    (run / "checkpoints" / tag / "config.json").write_text(json.dumps(to_dict(cfg), default=str))
    total = sum(s.steps for s in cfg.stages) if steps is None else steps
    write_run_rows = [{"stage": "init", "step": 0}] + [{"stage": "sft", "step": i} for i in range(1, total + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in write_run_rows))
    return run


def test_a_given_main_run_must_be_the_main_config_at_that_seed(tmp_path):
    run = finished_main_run(tmp_path, 7)
    assert compare.check_main_run(run, 7) == tmp_path / "assets"
    with pytest.raises(ValueError, match=r"differs from configs/digits_demo.yaml at seed 8 in \['runtime.seed'\]"):
        compare.check_main_run(run, 8)
    changed = finished_main_run(tmp_path / "b", 7, ["rl.dynamic_sampling=null", "rollout.n=4"])
    with pytest.raises(ValueError, match=r"in \['rl.dynamic_sampling', 'rollout.n'\]"):
        compare.check_main_run(changed, 7)
    short = finished_main_run(tmp_path / "c", 7, steps=100)
    with pytest.raises(ValueError, match="100 step rows in metrics.jsonl, the config has 480 steps"):
        compare.check_main_run(short, 7)
    with pytest.raises(FileNotFoundError, match="no checkpoints/latest"):
        compare.check_main_run(tmp_path / "nothing", 7)
