"""MoE routing replay (trainer/routing_replay.py): the engine's routes through the batch and the
packs, the config's refusals, and on two gloo ranks (routing_replay_worker.py, one launch) the
trainer replaying the embedded engine's routes at EP=2 (alltoall, allgather), PP=2 (with full
recompute) and TP=2 + SP, in score_rows, update and grpo_step."""
import os

import pytest
import torch

from megatron_vlm.rl.config import RLConfig, RolloutConfig
from megatron_vlm.rl.overlong import ForcedAnswerConfig
from megatron_vlm.rollout.protocol import RolloutSample
from megatron_vlm.rollout.vllm_engine import VllmEngineConfig
from megatron_vlm.trainer.actor_batch import build_batch, pack_rows
from megatron_vlm.trainer.routing_replay import merge_forced_routes
from tests.rollout.test_embedded import fixture_requests
from tests.utils import run_worker

WORKER = os.path.join(os.path.dirname(__file__), "routing_replay_worker.py")
LAYERS, TOP_K = 3, 2


def samples_with_routes(response_lengths=(3, 5, 1), short_by=1):
    """One sample per fixture prompt; routes [tokens - short_by, L, k] numbered by position."""
    _, prepared = fixture_requests()
    out = []
    for i, n in enumerate(response_lengths):
        prompt = prepared[f"r{i}"].input_ids.tolist()
        tokens = len(prompt) + n - short_by
        routes = (torch.arange(tokens)[:, None, None] * 10 + i + torch.zeros(1, LAYERS, TOP_K)).to(torch.int16)
        out.append(RolloutSample(f"r{i}", 0, prompt, list(range(1, n + 1)), [-0.1] * n, "length", 0.0,
                                 {"routed_experts": routes}))
    return out, prepared


def test_batch_and_packs_carry_the_routes_in_pack_order():
    samples, prepared = samples_with_routes()
    batch, images, patches = build_batch(samples, prepared, pad_id=0, spatial_merge_size=2, with_routes=True)
    assert batch.routed_experts.shape == (3, batch.input_ids.shape[1], LAYERS, TOP_K)
    assert batch.routed_experts.dtype == torch.int16
    lengths = batch.row_lengths()
    for row in range(3):  # the final token (never run by the engine) and the row padding: -1
        assert (batch.routed_experts[row, lengths[row] - 1:] == -1).all()
        assert (batch.routed_experts[row, :lengths[row] - 1] >= 0).all()
    pack = pack_rows(batch, [2, 0], images, patches, pad_to_multiple=8)
    assert pack.routed_experts.shape == (pack.tokens, LAYERS, TOP_K)
    first, second = lengths[2], lengths[0]
    assert torch.equal(pack.routed_experts[:first], batch.routed_experts[2, :first])
    assert torch.equal(pack.routed_experts[first:first + second], batch.routed_experts[0, :second])
    assert (pack.routed_experts[first + second:] == -1).all() and pack.tokens > first + second  # tail
    assert build_batch(samples, prepared, 0, 2)[0].routed_experts is None  # not asked for


def test_routes_of_the_wrong_length_or_missing_are_named():
    samples, prepared = samples_with_routes(short_by=2)
    with pytest.raises(ValueError, match="r0/0: routed experts of shape"):
        build_batch(samples, prepared, 0, 2, with_routes=True)
    samples, prepared = samples_with_routes()
    samples[1].metadata = {}
    with pytest.raises(ValueError, match="r1/0 has no routed experts"):
        build_batch(samples, prepared, 0, 2, with_routes=True)


def test_config_accepts_the_embedded_engine_and_names_what_vllm_needs():
    rollout = RolloutConfig()
    RLConfig(routing_replay=True).check(rollout)  # the embedded engine records its routes
    RLConfig(routing_replay=True, engine="vllm", vllm=VllmEngineConfig(return_routed_experts=True)).check(rollout)
    with pytest.raises(ValueError, match="rl.routing_replay.*rl.vllm.return_routed_experts"):
        RLConfig(routing_replay=True, engine="vllm").check(rollout)
    RLConfig(routing_replay=True, forced_answer=ForcedAnswerConfig()).check(rollout)  # routes merged


def test_a_forced_answer_keeps_the_first_generations_routes_and_takes_the_rest_from_the_continuation():
    # prompt 3 + response 2 tokens: the first pass routed 4 (never the last response token); the
    # continuation re-ran prompt + response + 1 inserted id and answered 2: 8 tokens, 7 routed
    first = torch.arange(4 * 2 * 1, dtype=torch.int16).reshape(4, 2, 1)
    continued = 100 + torch.arange(7 * 2 * 1, dtype=torch.int16).reshape(7, 2, 1)
    merged = merge_forced_routes(first, continued, tokens=8)
    assert merged.shape == (7, 2, 1)
    assert torch.equal(merged[:4], first) and torch.equal(merged[4:], continued[4:])
    with pytest.raises(ValueError, match="do not cover one sequence of 9 tokens"):
        merge_forced_routes(first, continued, tokens=9)
    with pytest.raises(ValueError, match="do not cover"):
        merge_forced_routes(first, continued[:, :1], tokens=8)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_worker(WORKER, tmp_path_factory.mktemp("routing_replay"), timeout=500)


LAYOUTS = ["ep2", "ep2_allgather", "pp2", "tp2_sp", "cp2"]


@pytest.mark.dist
def test_engine_routes_cover_prompt_images_and_response(report):
    assert report["routes_shape"] == [report["tokens"] - 1, LAYERS, TOP_K]
    assert report["image_tokens"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_trainer_routes_as_the_engine_that_holds_its_weights(report, layout):
    """No replay: the recording lines up with the trainer's tokens (image positions included)."""
    assert report[layout]["exact_match"] == 1.0
    assert report[layout]["exact_mismatch"] < 1e-6


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_replay_takes_the_flipped_engines_routes_and_shrinks_the_mismatch(report, layout):
    figures = report[layout]
    assert figures["off_match"] < 0.9               # the perturbed routers route differently
    assert figures["on_match"] == 1.0               # every (token, layer) as the engine did
    assert figures["on_mismatch"] < 0.5 * figures["off_mismatch"]


@pytest.mark.dist
def test_replay_follows_packing_dealing_and_the_update(report):
    ep2 = report["ep2"]
    assert ep2["packed_on_match"] == 1.0            # several packs per DP rank
    assert abs(ep2["packed_on_mismatch"] - ep2["on_mismatch"]) < 1e-6
    assert ep2["no_routes_max_diff"] == 0.0         # a replay-built model without routes: as usual
    assert ep2["update_on_match"] == 1.0 and ep2["update_off_match"] < 0.9
    assert ep2["update_on_recompute_match"] == 1.0
    assert ep2["update_on_recompute_router_calls"] == 2 * ep2["update_on_router_calls"]  # recomputed


@pytest.mark.dist
def test_recompute_in_the_backward_replays_each_micro_batch_own_routes(report):
    pp2 = report["pp2"]
    assert pp2["recompute_forwards"] == pp2["recompute_backwards"] > 1
    assert pp2["recompute_distinct_packs"] == pp2["recompute_forwards"]
    assert pp2["recompute_same_routes"] and pp2["recompute_match"] == 1.0


@pytest.mark.dist
def test_grpo_step_replays_under_rl_routing_replay(report):
    grpo = report["grpo"]
    assert grpo["on_match"] == 1.0 and grpo["on_update_match"] == 1.0
    assert grpo["off_match"] < 0.9                  # measured only: the engine returned routes
    assert grpo["on_sync_mean_abs"] < 0.5 * grpo["off_sync_mean_abs"]


def test_context_parallelism_is_accepted_with_routing_replay():
    """The packs cut the routes per CP rank (the cp2 layout above replays them exactly)."""
    from megatron_vlm.config import load_config

    cfg = load_config("configs/qwen3_vl_30b_a3b_grpo.yaml", ["rl.routing_replay=true", "parallel.cp=2",
                                                            "rl.vllm.return_routed_experts=true"])
    cfg.check(cfg.world_size())  # raised "rl.routing_replay with parallel.cp > 1" before
    assert cfg.rl.routing_replay and cfg.parallel.cp == 2  # both kept, nothing switched off


@pytest.mark.slow
@pytest.mark.dist
def test_the_cli_run_replays_under_rl_routing_replay(tmp_path):
    """The wiring of a run: the policy built for replay, the embedded engine asked for routes,
    a reference policy (k3 KL) scoring the same routed batch by its own routing."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_vlm.cli", "train", "--config", "configs/digits_demo.yaml",
           "stages=[{kind: grpo, steps: 3}]", "update.loss={name: dapo, kl_type: k3, kl_coef: 0.01}",
           "rl.routing_replay=true", "rollout.prompts_per_step=4", "rollout.n=4", "eval.samples=8",
           "eval.every=3", f"train.out_dir={out}", f"vlm.assets={tmp_path / 'assets'}", "--timeout", "600"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r and r["stage"] == "grpo"]
    assert trained, "no GRPO step trained (every group tied)"
    assert all(r["routing_replay_match"] == 1.0 and r["routing_replay_match_update"] == 1.0 for r in trained)
