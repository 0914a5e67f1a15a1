"""The main job against its equal-time SFT-only baseline, over seeds: runs both, writes the table
and the plot the README shows.

    python launch/compare_sft_rl.py --seeds 1234 1 2                 # runs 2 x 3 jobs, then writes docs/
    python launch/compare_sft_rl.py --seeds 1234 1 2 --reuse         # train only the runs not finished
    python launch/compare_sft_rl.py --seeds 1 --main-run 1=runs/sweep/seed_1/dyn   # a main job already run

Arms: `configs/digits_demo.yaml` (SFT on demonstrations of some kinds, then GRPO on prompts of
every kind) and `configs/digits_demo_sft_baseline.yaml` (SFT only, on the same demonstrations).
Equal time is measured, not assumed: at each seed the main job runs first, and the baseline's SFT
stage gets as many steps as the main job's training seconds buy at the main job's own SFT seconds
per step (`equal_time_steps`), with the baseline config's number of evaluations; a GRPO step's
cost depends on the machine and, with dynamic sampling, on the run. Each seed is the run's
`runtime.seed`: the demo's data (images, questions, the held-out split), the initial weights and
every draw; both arms of a seed share the assets (`OUT/seed_<s>/assets`). Runs go to
`OUT/seed_<s>/<arm>`, one at a time (2 ranks each). `--main-run SEED=DIR` takes a finished run of
the main config instead (a `launch/grpo_sweep.py` variant equal to it: the SFT stage then a
resume from its end): the run's saved config must be the main config at that seed, paths aside
(`check_main_run`), and its wall time is not known (one run in two processes).

Written (`--docs`, default docs/): `digits_kinds.md`, the table: final held-out accuracy overall,
per kind and strict (correct and well formed), max's accuracy when the left / right digit is the
larger one and the lower of those two (a policy answering one side's digit scores ~0 there), the
training seconds (sum of step times, evaluations excluded) and the wall time of each run, as
mean +/- sample standard deviation over the seeds with every seed's value;
`digits_kinds.png`, per-kind held-out accuracy against training seconds, both arms on one figure
(one thin line per seed, the mean over seeds bold); `digits_kinds.json`, the same numbers.
The headline kinds are those the main job has no demonstrations of (eval kinds - vlm.kinds.sft).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"sft_grpo": "configs/digits_demo.yaml", "sft_only": "configs/digits_demo_sft_baseline.yaml"}
LABELS = {"sft_grpo": "SFT then GRPO (main job)", "sft_only": "SFT only, equal time (baseline)",
          "after_sft": "main job after its SFT stage (where GRPO starts)"}
SLICE = "larger"  # eval.slice_by of the demo: which digit is larger


def run_arm(config: str, seed: int, out: Path, timeout: float, assets: Path, extra: list[str]) -> float:
    """Train one arm at one seed into `out`; its wall seconds."""
    command = [sys.executable, "-m", "megatron_vlm.cli", "train", "--config", config, f"runtime.seed={seed}",
               f"vlm.assets={assets}", f"train.out_dir={out}", *extra, "--overwrite", "--timeout", str(timeout)]
    print("+ " + " ".join(command), flush=True)
    start = time.monotonic()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.monotonic() - start


def equal_time_steps(main_rows: list[dict]) -> int:
    """SFT steps costing the main job's training seconds: their sum over its SFT seconds per step
    (the mean step time of its first stage, an SFT stage on the baseline's batches)."""
    first = next(r["stage"] for r in main_rows if r["stage"] != "init")
    sft = [r["step_seconds"] for r in main_rows if r["stage"] == first and "step_seconds" in r]
    if not sft:
        raise ValueError(f"the main job's metrics have no timed step of its first stage ({first!r})")
    total = sum(r.get("step_seconds", 0.0) for r in main_rows)
    return max(1, round(total / statistics.fmean(sft)))


def baseline_overrides(baseline, steps: int) -> list[str]:
    """The baseline config's single SFT stage at `steps`, with as many evaluations as it has now."""
    if len(baseline.stages) != 1 or baseline.stages[0].kind != "sft":
        raise ValueError(f"{ARMS['sft_only']}: the baseline must be one SFT stage, got "
                         f"{[s.kind for s in baseline.stages]}")
    every = baseline.stages[0].eval_every or baseline.eval.every
    evaluations = max(1, baseline.stages[0].steps // every)
    stage = {**dataclasses.asdict(baseline.stages[0]), "steps": steps, "eval_every": None}  # eval.every below
    return ["stages=" + json.dumps([stage]), f"eval.every={max(1, round(steps / evaluations))}"]


def check_main_run(run: Path, seed: int) -> Path:
    """A finished run of the main config at `seed` (its last checkpoint's config.json equal to it,
    vlm.assets and train.out_dir aside, and a metrics row for every step); its assets."""
    from megatron_vlm.config import load_config, to_dict

    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"--main-run {seed}={run}: no checkpoints/latest (not a finished run)")
    saved = json.loads((run / "checkpoints" / latest.read_text().strip() / "config.json").read_text())
    paths = [f"vlm.assets={saved['vlm']['assets']}", f"train.out_dir={saved['train']['out_dir']}"]
    cfg = load_config(ROOT / ARMS["sft_grpo"], [f"runtime.seed={seed}", *paths])
    expected = json.loads(json.dumps(to_dict(cfg), default=str))
    differ = sorted(differences(expected, saved))
    if differ:
        raise ValueError(f"--main-run {seed}={run}: its config differs from {ARMS['sft_grpo']} at seed {seed} "
                         f"in {differ}")
    steps = sum(1 for r in read_rows(run) if r["stage"] != "init")
    if steps != sum(stage.steps for stage in cfg.stages):
        raise ValueError(f"--main-run {seed}={run}: {steps} step rows in metrics.jsonl, the config has "
                         f"{sum(stage.steps for stage in cfg.stages)} steps (unfinished?)")
    return Path(saved["vlm"]["assets"])


def differences(a, b, prefix: str = ""):
    """The dotted keys where two nested dicts differ (a list or a value compared whole)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix.rstrip(".")] if a != b else []
    return [d for key in a.keys() | b.keys() for d in differences(a.get(key), b.get(key), f"{prefix}{key}.")]


def read_rows(run: Path) -> list[dict]:
    from megatron_vlm.report import read_rows as rows_of  # one reader of metrics.jsonl

    return rows_of(run)


def curve(rows: list[dict]) -> list[dict]:
    """Every evaluation with the training seconds before it (the sum of the step times so far)."""
    seconds, points = 0.0, []
    for row in rows:
        seconds += row.get("step_seconds", 0.0)
        if "eval_accuracy" in row:
            points.append({"seconds": seconds, "stage": row["stage"], "step": row["step"],
                           **{k: v for k, v in row.items() if k.startswith("eval")}})
    return points


def final_figures(rows: list[dict], kinds: list[str], stage: str | None = None) -> dict[str, float]:
    """The last evaluation's figures (of `stage`, when given): overall, strict, per kind (and
    strict), max left / right."""
    points = [p for p in curve(rows) if stage is None or p["stage"] == stage]
    last = points[-1]
    figures = {"overall": last["eval_accuracy"], "overall strict": last["eval_strict_accuracy"]}
    for kind in kinds:
        figures[kind] = last[f"eval/accuracy/{kind}"]
        figures[f"{kind} strict"] = last[f"eval/strict_accuracy/{kind}"]
    sides = {side: last[f"eval/accuracy/max/{SLICE}={side}"] for side in ("left", "right")
             if f"eval/accuracy/max/{SLICE}={side}" in last}
    for side, accuracy in sides.items():
        figures[f"max, {side} digit larger"] = accuracy
    if len(sides) == 2:  # a policy that answers one side's digit scores ~0 here: the skill, not a shortcut
        figures["max, weaker side (lower of the two)"] = min(sides.values())
    figures["training seconds"] = last["seconds"]
    return figures


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict, kinds: list[str], unseen: list[str], seeds: list[int], commit: str) -> str:
    """The markdown table: one row per figure, one column per arm (mean +/- sd, then each seed)."""
    arms = list(results)
    names = list(next(iter(results.values()))[seeds[0]]["final"])
    head = "| held-out (last evaluation) | " + " | ".join(LABELS[a] for a in arms) + " |"
    lines = [head, "|---|" + "---:|" * len(arms)]
    for name in names + ["wall seconds"]:
        cells = []
        for arm in arms:
            values = [results[arm][s]["wall" if name == "wall seconds" else "final"] for s in seeds]
            values = values if name == "wall seconds" else [v[name] for v in values]
            if any(v != v for v in values):  # NaN: not measured for this column (the SFT stage's wall time)
                cells.append("—")
                continue
            mean, spread = mean_spread(values)
            pct = "seconds" not in name
            fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.0f}")
            cells.append(f"{fmt(mean)} ± {fmt(spread).rstrip('%')}" + (" pts" if pct else "")
                         + f" ({' / '.join(fmt(v) for v in values)})")
        label = f"**{name}** (no demonstrations)" if name in unseen else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    note = (f"\nSeeds {', '.join(map(str, seeds))} (runtime.seed: data, initial weights, draws); mean ± sample "
            f"standard deviation over seeds, each seed's value in brackets in seed order. Held-out accuracy is "
            f"greedy decoding on every held-out row ({', '.join(kinds)}), scored by the verifier; strict also needs "
            f"a well-formed response (think block opened and closed, reasoning in it, an answer after it). "
            f"Training seconds: the sum of the step times (evaluations excluded); wall seconds: the whole run. "
            f"Commit {commit}.\n")
    return "\n".join(lines) + "\n" + note


def plot(results: dict, kinds: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all kinds", "eval_accuracy")] + [(kind, f"eval/accuracy/{kind}") for kind in kinds]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    colors = {"sft_grpo": "tab:red", "sft_only": "tab:blue"}
    for ax, (title, key) in zip(axes, panels):
        for arm, by_seed in results.items():
            curves = [[(p["seconds"], p[key]) for p in by_seed[s]["curve"]] for s in seeds]
            for points in curves:
                ax.plot(*zip(*points), color=colors[arm], alpha=0.3, linewidth=0.8)
            if len({len(c) for c in curves}) == 1:  # same evaluation steps at every seed: mean over seeds
                mean = [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves))
                        for i in range(len(curves[0]))]
                ax.plot(*zip(*mean), color=colors[arm], marker="o", markersize=3, label=LABELS[arm])
        ax.set_title(f"held-out accuracy: {title}")
        ax.set_xlabel("training seconds (evaluations excluded)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def commit_of(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    return sha + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs (those with a .wall file) and train only the others")
    parser.add_argument("--commit", help="the commit the runs ran at (default: this checkout's HEAD)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--main-run", action="append", default=[], metavar="SEED=DIR",
                        help="a finished run of the main config at SEED to use as that seed's main job")
    args = parser.parse_args(argv)
    from megatron_vlm.config import load_config

    main_cfg, baseline_cfg = (load_config(ROOT / ARMS[arm], []) for arm in ("sft_grpo", "sft_only"))
    commit = args.commit or commit_of(ROOT)  # before the runs: the checkout may change while they train
    given = {}
    for item in args.main_run:
        seed, _, run = item.partition("=")
        if not seed.lstrip("-").isdigit() or not run or int(seed) not in args.seeds:
            raise ValueError(f"--main-run {item!r}: expected SEED=DIR with SEED one of --seeds {args.seeds}")
        given[int(seed)] = Path(run)
    results: dict = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        assets = check_main_run(given[seed], seed) if seed in given else args.out / f"seed_{seed}" / "assets"
        for arm, config in ARMS.items():  # the main job first: the baseline's steps come from its seconds
            out = given[seed] if arm == "sft_grpo" and seed in given else args.out / f"seed_{seed}" / arm
            wall_file = args.out / f"seed_{seed}" / f"{arm}.wall"
            wall_file.parent.mkdir(parents=True, exist_ok=True)
            if not (args.reuse and wall_file.exists()) and out != given.get(seed):
                extra = [] if arm == "sft_grpo" else baseline_overrides(
                    baseline_cfg, equal_time_steps(results["sft_grpo"][seed]["rows"]))
                wall_file.write_text(f"{run_arm(config, seed, out, args.timeout, assets, extra):.1f}\n")
            rows = read_rows(out)
            results[arm][seed] = {"rows": rows, "wall": float(wall_file.read_text())
                                  if wall_file.exists() and out != given.get(seed) else float("nan")}
    last = results["sft_grpo"][args.seeds[0]]["rows"]
    kinds = sorted(k.split("/")[-1] for k in next(r for r in reversed(last) if "eval_accuracy" in r)
                   if k.startswith("eval/samples/") and "=" not in k)
    unseen = [k for k in kinds if k not in (main_cfg.vlm.kinds.sft or kinds)]
    kinds = unseen + [k for k in kinds if k not in unseen]  # the headline kinds first
    for arm in results:
        for seed, run in results[arm].items():
            run["curve"], run["final"] = curve(run["rows"]), final_figures(run["rows"], kinds)
    start = {"after_sft": {seed: {"final": final_figures(run["rows"], kinds, stage="sft"), "wall": float("nan")}
                           for seed, run in results["sft_grpo"].items()}}
    args.docs.mkdir(parents=True, exist_ok=True)
    steps = {arm: [sum(r["stage"] != "init" for r in results[arm][s]["rows"]) for s in args.seeds] for arm in results}
    text = table({**results, **start}, kinds, unseen, args.seeds, commit)
    text += (f"Training steps per seed: {LABELS['sft_grpo']} {' / '.join(map(str, steps['sft_grpo']))}, "
             f"{LABELS['sft_only']} {' / '.join(map(str, steps['sft_only']))} (`equal_time_steps`).\n")
    (args.docs / "digits_kinds.md").write_text(text)
    plot(results, kinds, args.seeds, args.docs / "digits_kinds.png")
    (args.docs / "digits_kinds.json").write_text(json.dumps(
        {"commit": commit, "seeds": args.seeds, "kinds": kinds, "no_demonstrations": unseen, "steps": steps,
         "runs": {arm: {seed: {"final": run["final"], "wall_seconds": run["wall"], "curve": run["curve"]}
                        for seed, run in by_seed.items()} for arm, by_seed in results.items()},
         "main_job_after_sft": {seed: run["final"] for seed, run in start["after_sft"].items()}}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
