"""A run, shown: its curves (`plot_run`, the curves.png every run writes), several runs compared
(`compare_runs`), and a self-contained HTML page of both plus the sampled rollouts (`render_report`).

    megatron-vlm report RUN_DIR [--out RUN_DIR/report.html]
    megatron-vlm report --compare RUN_A RUN_B ... --out compare.png

Everything is read from the run directory: `metrics.jsonl` (one row per step, all stages) and
`samples/step_*.jsonl` (trainer/samples.py). The page embeds its figures and images as data URIs,
so it can be mailed or attached as one file; the table filters by reward and task in the browser.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

WINDOW = 5  # steps in the reward's moving average: each step samples other prompts
PANELS = (  # (title, keys): a panel is drawn when any of its keys is in the rows
    ("training loss", ("loss",)),
    ("entropy", ("entropy",)),
    ("KL to the reference", ("kl_loss", "kl")),
    ("clipped share", ("clip_frac", "clip_frac_low", "clip_frac_high", "clipfrac")),
    ("response length (tokens)", ("response_length",)),
)


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a megatron-vlm run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib  # drawing is for rank 0 at the end of a run, and for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(kind, first row, last row) of each stage in the order the run met them."""
    spans: list[list] = []
    for i, row in enumerate(rows):
        kind = row.get("stage")
        if kind == "init":
            continue
        if not spans or spans[-1][0] != kind or row["step"] <= rows[spans[-1][2]]["step"]:
            spans.append([kind, i, i])
        spans[-1][2] = i
    return [tuple(s) for s in spans]


def plot_run(rows: list[dict], path: Path) -> None:
    """Eval accuracy per stage with the stage boundaries labelled (overall, strict, and per kind
    when the run logged kinds), the reward smoothed over `WINDOW` steps with the raw values faint
    behind it (and per kind, smoothed), the step-time breakdown stacked by phase,
    and whichever of loss / entropy / KL / clip share / response length the run logged."""
    plt = _pyplot()
    panels = [(title, keys) for title, keys in PANELS if any(k in r for r in rows for k in keys)]
    rows_of_panels = -(-(3 + len(panels)) // 3)
    fig, grid = plt.subplots(rows_of_panels, 3, figsize=(15, 4 * rows_of_panels), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[3 + len(panels):]:
        ax.set_visible(False)
    axes = axes[:3 + len(panels)]
    spans = stage_spans(rows)
    _eval_panel(axes[0], rows, spans)
    _reward_panel(axes[1], rows)
    _time_panel(axes[2], rows)
    for ax, (title, keys) in zip(axes[3:], panels):
        for key in keys:
            points = [(i, r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step (all stages)")
        for kind, first, _ in spans[1:]:
            ax.axvline(first - 0.5, color="grey", linestyle=":", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def kind_names(rows: list[dict], prefix: str = "eval/accuracy/") -> list[str]:
    """The kinds with a per-kind figure under `prefix` in the rows (slices left out), sorted."""
    return sorted({k[len(prefix):] for r in rows for k in r if k.startswith(prefix) and "/" not in k[len(prefix):]})


def _eval_panel(ax, rows, spans) -> None:
    points = [(i, r["eval_accuracy"]) for i, r in enumerate(rows) if "eval_accuracy" in r]
    if points:
        ax.plot(*zip(*points), marker="o", color="tab:blue", label="all kinds")
    strict = [(i, r["eval_strict_accuracy"]) for i, r in enumerate(rows) if "eval_strict_accuracy" in r]
    if strict:
        ax.plot(*zip(*strict), color="tab:blue", linestyle="--", linewidth=0.9, label="all, strict (well formed)")
    for kind in kind_names(rows):
        key = f"eval/accuracy/{kind}"
        ax.plot(*zip(*[(i, r[key]) for i, r in enumerate(rows) if key in r]), marker=".", linewidth=0.9, label=kind)
    top = max([v for _, v in points] + [r[k] for r in rows for k in r if k.startswith("eval/accuracy/")] + [1e-9])
    for kind, first, last in spans:
        ax.text((first + last) / 2, top * 1.02, kind, ha="center", va="bottom", fontsize=8, color="dimgrey")
    ax.set_ylim(0, max(1.0, top * 1.12))
    if strict or kind_names(rows):
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("held-out accuracy, by stage and kind")


def _reward_panel(ax, rows) -> None:
    rewards = [(i, r["reward"]) for i, r in enumerate(rows) if isinstance(r.get("reward"), (int, float))]
    if rewards:
        steps, values = zip(*rewards)
        ax.plot(steps, values, color="tab:orange", alpha=0.25, label="per step")
        ax.plot(steps, _trailing_mean(values), color="tab:orange", label=f"mean of {WINDOW}")
        for kind in kind_names(rows, "reward/by_kind/"):
            key = f"reward/by_kind/{kind}"
            steps, values = zip(*[(i, r[key]) for i, r in enumerate(rows) if key in r])
            ax.plot(steps, _trailing_mean(values), linewidth=0.9, label=f"{kind}, mean of {WINDOW}")
        ax.legend(fontsize=7)
    ax.set_title("verifier reward (raw)")


def _trailing_mean(values) -> list[float]:
    return [sum(values[max(0, j - WINDOW + 1):j + 1]) / len(values[max(0, j - WINDOW + 1):j + 1])
            for j in range(len(values))]


def _time_panel(ax, rows) -> None:
    phases = sorted({k for r in rows for k in r if k.startswith("time_")})
    x = list(range(len(rows)))
    if phases:
        stacks = [[r.get(p, 0.0) for r in rows] for p in phases]
        ax.stackplot(x, stacks, labels=[p[5:] for p in phases], alpha=0.8)
        ax.legend(fontsize=7, loc="upper left")
    steps = [(i, r["step_seconds"]) for i, r in enumerate(rows) if "step_seconds" in r]
    if steps:
        ax.plot(*zip(*steps), color="black", linewidth=0.8, label="step")
    ax.set_title("step time by phase (s)")


def compare_runs(run_dirs: list[Path], out: Path) -> None:
    """Held-out accuracy and smoothed reward per step, one line per run (labelled by its
    directory's name), steps counted over all stages of each run; where the runs logged the
    weight-sync check, a third panel with the engine-vs-trainer KL of the sampled tokens (the
    train / inference mismatch routing replay and rollout correction are for)."""
    plt = _pyplot()
    all_rows = {Path(run).name: read_rows(run) for run in run_dirs}
    with_kl = any("sync_logprob_kl" in r for rows in all_rows.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if with_kl else 2, figsize=(19 if with_kl else 13, 4.5))
    acc, rew = axes[0], axes[1]
    for label, rows in all_rows.items():
        if with_kl:
            kl = [(i, r["sync_logprob_kl"]) for i, r in enumerate(rows) if "sync_logprob_kl" in r]
            if kl:
                axes[2].semilogy(*zip(*kl), marker=".", label=label)
        points = [(i, r["eval_accuracy"]) for i, r in enumerate(rows) if "eval_accuracy" in r]
        if points:
            acc.plot(*zip(*points), marker="o", label=label)
        rewards = [(i, r["reward"]) for i, r in enumerate(rows) if "reward" in r]
        if len(rewards) >= WINDOW:  # a trailing mean: each step samples other prompts
            steps, values = zip(*rewards)
            smooth = [sum(values[j - WINDOW + 1:j + 1]) / WINDOW for j in range(WINDOW - 1, len(values))]
            rew.plot(steps[WINDOW - 1:], smooth, label=label)
    acc.set_title("held-out accuracy (greedy)")
    rew.set_title(f"verifier reward, mean of the last {WINDOW} steps' samples")
    if with_kl:
        axes[2].set_title("engine vs trainer log-probs: k3 KL per step (sync check)")
    for ax in axes:
        ax.set_xlabel("step (all stages of the run)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def read_samples(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(run_dir) / "samples").glob("step_*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def render_report(run_dir: Path, out: Path | None = None) -> Path:
    """The run's page (default RUN_DIR/report.html): its curves and its sampled rollouts."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    rows, samples = read_rows(run_dir), read_samples(run_dir)
    figure = io.BytesIO()
    plot_run(rows, figure)
    stages = [f"{kind} ({last - first + 1} steps)" for kind, first, last in stage_spans(rows)]
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    head = (f"<h1>{html.escape(run_dir.name)}</h1><p>{len(rows)} rows; stages: {html.escape(', '.join(stages))}; "
            f"held-out accuracy {_pct(evals[0])} &rarr; {_pct(evals[-1])}{_kinds_line(rows)}</p>" if evals else
            f"<h1>{html.escape(run_dir.name)}</h1><p>{len(rows)} rows</p>")
    page = _PAGE.format(title=html.escape(run_dir.name), head=head, curves=_data_uri(figure.getvalue(), "png"),
                        count=len(samples), tasks=_options(sorted({s["task"] for s in samples})),
                        rows="\n".join(_sample_row(run_dir, s) for s in samples))
    out.write_text(page)
    return out


def _kinds_line(rows: list[dict]) -> str:
    """'; by kind at the end: max 41.9% (strict 0.0%), ...' from the last evaluation with kinds."""
    last = next((r for r in reversed(rows) if any(k.startswith("eval/accuracy/") for k in r)), None)
    if last is None:
        return ""
    parts = [f"{html.escape(kind)} {_pct(last[f'eval/accuracy/{kind}'])}"
             + (f" (strict {_pct(last[f'eval/strict_accuracy/{kind}'])})" if f"eval/strict_accuracy/{kind}" in last else "")
             for kind in kind_names([last])]
    return "; by kind at the end: " + ", ".join(parts)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _options(tasks: list[str]) -> str:
    return "".join(f'<option value="{html.escape(t)}">{html.escape(t)}</option>' for t in tasks)


def _sample_row(run_dir: Path, s: dict) -> str:
    images = "".join(f'<img src="{_data_uri((run_dir / "samples" / name).read_bytes(), "png")}" alt="{html.escape(name)}">'
                     for name in s.get("images", []) if (run_dir / "samples" / name).is_file())
    failure = f'<div class="failure">{html.escape(s["failure"])}</div>' if s.get("failure") else ""
    return (f'<tr data-reward="{s["reward"]}" data-task="{html.escape(s["task"])}" class="{s["verdict"]}">'
            f'<td>{s["step"]}</td><td>{images}</td><td>{html.escape(s["prompt"])}</td>'
            f'<td><pre>{html.escape(s["response"])}</pre>{failure}</td><td>{html.escape(str(s.get("reference")))}</td>'
            f'<td>{s["reward"]:.3g}</td><td>{s["advantage"]:+.2f}</td><td>{s["verdict"]}</td>'
            f'<td>{s["response_length"]}{" (cut)" if s["truncated"] else ""}</td></tr>')


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
img.curves {{ max-width: 100%; }}
table {{ border-collapse: collapse; width: 100%; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
td img {{ width: 96px; image-rendering: pixelated; }}
pre {{ white-space: pre-wrap; margin: 0; }}
tr.correct {{ background: #eefbee; }} tr.wrong {{ background: #fdf0f0; }} tr.failed {{ background: #fff6d6; }}
.failure {{ color: #a05000; font-size: 12px; }}
</style></head><body>
{head}
<img class="curves" src="{curves}" alt="curves">
<h2>Sampled rollouts (<span id="shown">{count}</span> of {count})</h2>
<p>reward &ge; <input id="min" type="number" step="0.1" value="" placeholder="any">
reward &le; <input id="max" type="number" step="0.1" value="" placeholder="any">
task <select id="task"><option value="">all</option>{tasks}</select></p>
<table id="samples"><thead><tr><th>step</th><th>image</th><th>prompt</th><th>response</th><th>reference</th>
<th>reward</th><th>advantage</th><th>verdict</th><th>length</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<script>
function applyFilter() {{
  const lo = parseFloat(document.getElementById("min").value), hi = parseFloat(document.getElementById("max").value);
  const task = document.getElementById("task").value;
  let shown = 0;
  for (const row of document.querySelectorAll("#samples tbody tr")) {{
    const r = parseFloat(row.dataset.reward);
    const keep = (isNaN(lo) || r >= lo) && (isNaN(hi) || r <= hi) && (!task || row.dataset.task === task);
    row.style.display = keep ? "" : "none";
    shown += keep;
  }}
  document.getElementById("shown").textContent = shown;
}}
for (const id of ["min", "max", "task"]) document.getElementById(id).addEventListener("input", applyFilter);
const params = new URLSearchParams(location.search);
for (const id of ["min", "max", "task"]) if (params.has(id)) document.getElementById(id).value = params.get(id);
applyFilter();
</script></body></html>
"""
