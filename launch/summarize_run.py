"""Print a run's figures from its metrics.jsonl: held-out accuracy at every evaluation, and the
median per-phase time of each stage kind's steps (what the README's step tables quote).

    python launch/summarize_run.py runs/digits runs/digits_vllm

Medians, not means: the first step of a stage carries one-off costs (an engine's first batch).
"""
import json
import statistics
import sys
from pathlib import Path

PHASES = ("time_sync", "time_rollout", "time_reward", "time_old_logprobs", "time_ref_logprobs",
          "time_update", "step_seconds", "rollout_tokens_per_s", "train_tokens_per_s",
          "sync_logprob_max_abs", "sync_logprob_mean_abs", "mixed_group_share")


def summarize(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["stage"], r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    medians = {}
    for kind in sorted({r["stage"] for r in rows} - {"init"}):
        steps = [r for r in rows if r["stage"] == kind]
        medians[kind] = {key: statistics.median(r[key] for r in steps if key in r)
                         for key in PHASES if any(key in r for r in steps)}
        medians[kind]["steps"] = len(steps)
    return {"evals": evals, "medians": medians}


def main(runs: list[str]) -> None:
    for run in runs:
        summary = summarize(Path(run))
        print(f"== {run}")
        print("held-out accuracy: " + ", ".join(f"{stage} {step}: {acc:.1%}"
                                                for stage, step, acc in summary["evals"]))
        for kind, values in summary["medians"].items():
            print(f"{kind} (median of {values.pop('steps')} steps): " +
                  ", ".join(f"{key} {value:.3g}" for key, value in values.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
