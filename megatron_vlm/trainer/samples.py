"""Rollouts a person can read: every `train.samples.every` steps of a GRPO / RFT stage, rank 0
writes `train.out_dir/samples/step_XXXXXXX.jsonl` (the run's global step), one JSON object per
sampled rollout: the prompt text, its images (PNG files under samples/images/, by request id),
the response, the raw and normalised reward, the advantage of this draw (the run's estimator
on the normalised rewards, before any over-long shaping), the task, the verifier's
verdict and failure message if any, the response length and whether it was truncated.
`megatron-vlm report RUN_DIR` shows them in a browsable table.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from megatron_vlm.rl.advantages import AdvantageInputs, compute_advantages, group_index_from_ids

SAMPLES = "samples"


def group_advantages(samples, rewards: list[float], cfg) -> list[float]:
    """Each sample's advantage by the run's estimator (`update.advantage`, the function the update
    uses), from this draw's rewards, one value per sequence."""
    count = len(samples)
    inputs = AdvantageInputs(torch.tensor(rewards, dtype=torch.float),
                             group_index_from_ids([s.request_id for s in samples]),
                             torch.ones(count), torch.arange(count + 1))
    return compute_advantages(inputs, cfg).tolist()


def write_samples(out_dir: Path, step: int, samples, result, requests: dict, text, count: int,
                  advantage_cfg) -> Path:
    """Write `count` of a step's rollouts (seeded by the step); returns the file."""
    root = out_dir / SAMPLES
    (root / "images").mkdir(parents=True, exist_ok=True)
    failures = {f.sample_id: f for f in result.failures}
    advantages = group_advantages(samples, result.rewards, advantage_cfg)
    chosen = sorted(random.Random(step).sample(range(len(samples)), min(count, len(samples))))
    path = root / f"step_{step:07d}.jsonl"
    with open(path, "w") as f:
        for i in chosen:
            s = samples[i]
            sample_id = f"{s.request_id}#{s.index}"
            failure = failures.get(sample_id)
            f.write(json.dumps({
                "step": step, "id": sample_id, "task": s.metadata.get("task", "default"),
                "prompt": s.metadata.get("question", ""), "images": _images(root, requests[s.request_id]),
                "response": text(s.response_ids), "reference": _plain(s.metadata.get("reference")),
                "reward": result.raw[i], "reward_normalised": result.rewards[i], "advantage": advantages[i],
                "verdict": "failed" if failure else ("correct" if result.verdicts[i] >= 1.0 else "wrong"),
                "well_formed": result.well_formed[i] if result.well_formed else None, "kind": s.metadata.get("kind"),
                "failure": f"{failure.kind}: {failure.message[:500]}" if failure else None,
                "response_length": len(s.response_ids), "truncated": s.finish_reason == "length",
            }) + "\n")
    return path


def _images(root: Path, request) -> list[str]:
    names = []
    for k, image in enumerate(request.images):
        name = f"images/{_safe(request.request_id)}-{k}.png"
        if not (root / name).exists() and hasattr(image, "save"):
            image.save(root / name)
        names.append(name)
    return names


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
