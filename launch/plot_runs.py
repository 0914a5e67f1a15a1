"""Plot several runs' curves side by side: held-out accuracy and reward per step, one line per run.

    python launch/plot_runs.py OUT.png runs/recipes/grpo runs/recipes/dapo ...

Each run directory holds the metrics.jsonl that `megatron-vlm train` writes; the label is the
directory's name. Steps are counted over all stages of a run (stage boundaries dotted).
"""
import json
import sys
from pathlib import Path

WINDOW = 5


def main(out: str, runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, rew) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in runs:
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        label = Path(run).name
        points = [(i, r["eval_accuracy"]) for i, r in enumerate(rows) if "eval_accuracy" in r]
        acc.plot(*zip(*points), marker="o", label=label)
        rewards = [(i, r["reward"]) for i, r in enumerate(rows) if "reward" in r]
        if len(rewards) >= WINDOW:  # a trailing mean: each step samples other prompts
            steps, values = zip(*rewards)
            smooth = [sum(values[j - WINDOW + 1:j + 1]) / WINDOW for j in range(WINDOW - 1, len(values))]
            rew.plot(steps[WINDOW - 1:], smooth, label=label)
    acc.set_title("held-out accuracy (greedy, 256 unseen images)")
    rew.set_title(f"verifier reward, mean of the last {WINDOW} steps' samples")
    for ax in (acc, rew):
        ax.set_xlabel("step (all stages of the run)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
