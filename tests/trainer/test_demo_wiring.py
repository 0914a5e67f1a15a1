"""The main job's stages wired end to end on two gloo ranks (EP=2), with a few steps each:
assets, SFT, MPO against the reference policy, GRPO with the embedded engine, a text-shaped reward
(varied for a 3-step policy) with the demo's format reward and a k3 KL term, evaluation, metrics,
plot, HF export.
(The full demo is `megatron-vlm train --config configs/digits_demo.yaml`, a script, not a test.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.dist
def test_sft_then_grpo_then_export(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_vlm.cli", "train", "--config", "configs/digits_demo.yaml",
           "stages=[{kind: sft, steps: 4, batch_size: 8, eval_every: 3}, {kind: mpo, steps: 2, batch_size: 4}, "
           "{kind: grpo, steps: 2}]", "update.loss={name: dapo, kl_type: k3, kl_coef: 0.01}",
           "rollout.prompts_per_step=4", "rollout.n=4", "eval.samples=8", "eval.every=2",
           # a reward that varies for a 3-step policy, so GRPO's groups do not all tie and the KL and
           # sync checks below see trained steps (the numeric verifier under the demo's strict format
           # scores such a policy 0 everywhere)
           "reward.verifiers={digits: 'tests.trainer.resume_rewards:shaped'}", "reward.strict_format={digits: false}",
           f"train.out_dir={out}", f"vlm.assets={tmp_path / 'assets'}", "--timeout", "600"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["init", "sft", "sft", "sft", "sft", "mpo", "mpo", "grpo", "grpo"]
    # the demo's dynamic sampling leaves batch_groups unset: the batch is the 4 prompts a step
    # draws, refilled from at most 3 draws of 4 prompts x 4 answers
    for row in (r for r in rows if r["stage"] == "grpo"):
        assert 1 <= row["dynamic_draws"] <= 3 and row["samples"] == 16 * row["dynamic_draws"]
        assert row["dynamic_groups_kept"] <= 4 and row["dynamic_groups_seen"] == 4 * row["dynamic_draws"]
        assert (row["dynamic_draws"] == 3) or row["dynamic_groups_kept"] == 4  # stopped early only when full
    mpo = [r for r in rows if r["stage"] == "mpo"]
    assert all(k in r for r in mpo for k in ("loss", "reward_accuracy", "bco_loss", "sft_loss"))
    # the SFT stage's own eval_every (3) beside eval.every (2) for the others; every stage's end
    assert [(r["stage"], r["step"]) for r in rows if "eval_accuracy" in r] == [
        ("init", 0), ("sft", 3), ("sft", 4), ("mpo", 2), ("grpo", 2)]
    for row in (r for r in rows if "eval_accuracy" in r):  # every evaluation, per kind and strict
        assert {f"eval/{what}/{kind}" for what in ("accuracy", "strict_accuracy", "samples")
                for kind in ("sum", "max", "difference")} | {"eval_strict_accuracy"} <= set(row)
        assert sum(row[f"eval/samples/{kind}"] for kind in ("sum", "max", "difference")) == row["eval_samples"] == 8
        assert any(k.startswith("eval/accuracy/max/larger=") for k in row)  # eval.slice_by: [larger]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    for key in ("reward", "mixed_group_share", "response_length", "sync_seconds", "time_rollout",
                "time_reward", "rollout_tokens_per_s"):
        assert all(key in r for r in grpo), key
    assert all(any(k.startswith("reward/by_kind/") for k in r) for r in grpo)  # the kinds the step drew
    assert all(0 <= v <= 1 for r in grpo for k, v in r.items() if k.endswith("/well_formed"))
    assert all(any(k.startswith("reward/by_kind/") and k.endswith("/well_formed") for k in r) for r in grpo)
    assert all("reward/digits/verdict_mean" in r for r in grpo)  # the verifier's mean beside the format-shaped reward
    trained = [r for r in grpo if "loss" in r]  # a step whose groups all tie trains on nothing
    assert trained, "no GRPO step trained: every group tied"
    assert all(r["sync_logprob_max_abs"] < 1e-4 for r in trained)
    assert all(r["kl_loss"] >= 0 and "time_ref_logprobs" in r for r in trained)  # reference = MPO's end
    assert (out / "curves.png").stat().st_size > 0
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    from megatron_vlm.data.processor import MultimodalProcessor

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(out / "hf_export"))
    # tokenizer + image processor carried over (AutoProcessor itself also wants torchvision)
    MultimodalProcessor.from_pretrained(out / "hf_export")
    assert AutoConfig.from_pretrained(str(out / "hf_export")).architectures == ["Qwen3VLMoeForConditionalGeneration"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
