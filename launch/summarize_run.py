"""Print a run's figures from its metrics.jsonl: held-out accuracy at every evaluation, what the
evaluations cost, and the median per-phase time of each stage kind's steps (what the README's step
tables quote).

    python launch/summarize_run.py runs/digits runs/digits_vllm
    python launch/summarize_run.py runs/digits --same-as runs/digits_before

Medians, not means: the first step of a stage carries one-off costs (an engine's first batch).
`--same-as RUN` checks that every run trained as RUN did: the same (stage, step) rows with the same
values, timings and evaluations aside (a change of evaluation cadence or machine speed must not
change a training step); it names the first row and key that differ and exits 1.
"""
import argparse
import statistics
import sys
from pathlib import Path

from megatron_vlm.report import read_rows

PHASES = ("time_sync", "time_rollout", "time_reward", "time_old_logprobs", "time_ref_logprobs",
          "time_update", "step_seconds", "rollout_tokens_per_s", "train_tokens_per_s",
          "sync_logprob_max_abs", "sync_logprob_mean_abs", "mixed_group_share")
TIMING = ("seconds", "time_", "per_s")


def summarize(rows: list[dict]) -> dict:
    evals = [(r["stage"], r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    medians = {}
    for kind in sorted({r["stage"] for r in rows} - {"init"}):
        steps = [r for r in rows if r["stage"] == kind]
        medians[kind] = {key: statistics.median(r[key] for r in steps if key in r)
                         for key in PHASES if any(key in r for r in steps)}
        medians[kind]["steps"] = len(steps)
    return {"evals": evals, "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in rows),
            "step_seconds": sum(r.get("step_seconds", 0.0) for r in rows), "medians": medians}


def training_rows(rows: list[dict]) -> dict[tuple, dict]:
    """(stage, step) -> the row's values that training decides: timings and evaluations aside."""
    return {(r["stage"], r["step"]): {k: v for k, v in r.items()
                                      if not k.startswith("eval") and not any(t in k for t in TIMING)}
            for r in rows}


def first_difference(rows: list[dict], reference: list[dict]) -> str | None:
    """Where `rows` trained differently from `reference`; None when every training row is the same."""
    mine, theirs = training_rows(rows), training_rows(reference)
    if list(mine) != list(theirs):
        missing, extra = [k for k in theirs if k not in mine], [k for k in mine if k not in theirs]
        return f"other rows: missing {missing[:3]}, extra {extra[:3]}" if missing or extra else "rows in another order"
    for key, row in mine.items():
        for name in sorted(set(row) | set(theirs[key])):
            if row.get(name) != theirs[key].get(name):
                return f"{key[0]} step {key[1]}: {name} {row.get(name)!r} against {theirs[key].get(name)!r}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--same-as", type=Path, metavar="RUN", help="check that each run trained as RUN did")
    args = parser.parse_args(argv)
    reference = read_rows(args.same_as) if args.same_as is not None else None
    differs = False
    for run in args.runs:
        rows = read_rows(run)
        summary = summarize(rows)
        print(f"== {run}")
        print("held-out accuracy: " + ", ".join(f"{stage} {step}: {acc:.1%}"
                                                for stage, step, acc in summary["evals"]))
        print(f"evaluations: {len(summary['evals'])}, {summary['eval_seconds']:.0f} s; "
              f"steps: {summary['step_seconds']:.0f} s")
        for kind, values in summary["medians"].items():
            print(f"{kind} (median of {values.pop('steps')} steps): " +
                  ", ".join(f"{key} {value:.3g}" for key, value in values.items()))
        if reference is not None:
            where = first_difference(rows, reference)
            print(f"same training as {args.same_as}: " +
                  (f"yes, all {len(training_rows(rows))} rows" if where is None else f"no, {where}"))
            differs |= where is not None
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
