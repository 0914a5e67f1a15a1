"""The embedded engine after a weight sync: its log-probs for its own samples equal the trainer's,
and a corrupted bucket is caught by the sync check. Each test builds (and syncs) the engine it
needs, so they pass alone and in any order."""
import pytest
import torch

from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rollout.embedded import EmbeddedEngine, Prepared
from megatron_vlm.rollout.protocol import RolloutRequest, SamplingParams
from megatron_vlm.rollout.weight_sync import (SyncCheckConfig, WeightSyncError, check_logprobs,
                                              sync_weights)
from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs, score
from tests.models.vlm_fixtures import IMAGE, make_config, make_inputs

STOP = 7


def fixture_requests():
    """Requests whose processor output is fixed: two prompts with images, one text-only."""
    prepared, requests = {}, []
    layouts = [((6, (4, 6), 5),), ((3, (4, 4), 4, (4, 8), 2),), ((9,),)]
    for i, layout in enumerate(layouts):
        inputs = make_inputs(layout, seed=10 + i)
        n_images = 0 if inputs["image_grid_thw"].numel() == 0 else len(inputs["image_grid_thw"])
        prepared[f"r{i}"] = Prepared(
            inputs["input_ids"][0], inputs["mm_token_type_ids"][0],
            inputs["pixel_values"] if n_images else None,
            inputs["image_grid_thw"] if n_images else None)
        # the unexpanded prompt: one placeholder per image (what a chat template produces)
        ids = inputs["input_ids"][0].tolist()
        unexpanded = [t for j, t in enumerate(ids) if t != IMAGE or ids[j - 1] != IMAGE]
        requests.append(RolloutRequest(f"r{i}", unexpanded, metadata={"i": i}))
    return requests, prepared


@pytest.fixture(scope="module")
def setup(single_rank_runtime):
    hf_config = make_config("qwen3_vl_moe")
    family = family_for(hf_config)
    torch.manual_seed(0)
    model = family.build(hf_config, ParallelConfig(), "cpu").eval()
    requests, prepared = fixture_requests()
    return hf_config, family, model, requests, prepared


def new_engine(setup) -> EmbeddedEngine:
    hf_config, _, _, _, prepared = setup
    return EmbeddedEngine(hf_config, prepare=lambda r: prepared[r.request_id], pad_token_id=0)


@pytest.fixture
def engine(setup):
    """A fresh engine holding the trainer's weights."""
    hf_config, family, model, _, _ = setup
    engine = new_engine(setup)
    sync_weights(model, family.hf_rules(hf_config), engine, bucket_bytes=200_000)
    return engine


def test_generate_refuses_before_sync(setup):
    requests = setup[3]
    with pytest.raises(RuntimeError, match="before every weight was synced"):
        new_engine(setup).generate(requests, SamplingParams())


def test_engine_logprobs_equal_trainer_after_sync(setup):
    hf_config, family, model, requests, prepared = setup
    engine = new_engine(setup)
    stats = sync_weights(model, family.hf_rules(hf_config), engine, bucket_bytes=200_000)
    assert stats.tensors == len(engine.params) and not engine.missing_weights()
    largest_tensor = max(p.numel() * p.element_size() for p in engine.params.values())
    assert stats.largest_bucket_bytes <= max(200_000, largest_tensor)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=6, n=3, seed=5,
                              stop_token_ids=[STOP])
    samples = engine.generate(requests, sampling)
    assert len(samples) == 9 and {s.index for s in samples} == {0, 1, 2}
    assert all(s.finish_reason in ("stop", "length") for s in samples)
    assert all(len(s.response_ids) == len(s.logprobs) for s in samples)
    assert all(all(lp <= 0 for lp in s.logprobs) for s in samples)
    batch, _, _ = build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)
    trainer = response_logprobs(score(model, batch, sampling.temperature), batch)
    check = check_logprobs([s.logprobs for s in samples], trainer, SyncCheckConfig().resolved("float32"))
    assert check.max_abs < 1e-5
    print(f"sync check: max {check.max_abs:.2e} mean {check.mean_abs:.2e} over {check.tokens} tokens")
    assert check.tokens == sum(len(s.response_ids) for s in samples)


def test_same_seed_same_samples(setup, engine):
    requests = setup[3]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=5, n=2, seed=11)
    a = [s.response_ids for s in engine.generate(requests, sampling)]
    b = [s.response_ids for s in engine.generate(requests, sampling)]
    assert a == b


def test_corrupted_bucket_is_caught(setup, engine):
    hf_config, family, model, requests, prepared = setup
    rules = family.hf_rules(hf_config)

    def corrupt(buckets):
        for bucket in buckets:
            # expert ids mixed up (the local <-> global expert-id bug class)
            yield [(n, t.flip(0) if n.endswith("layers.2.mlp.experts.gate_up_proj") else t)
                   for n, t in bucket]

    from megatron_vlm.checkpoint.streaming import iter_hf_buckets

    engine.update_weights(corrupt(iter_hf_buckets(model, rules, 200_000)))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3)
    samples = engine.generate(requests, sampling)
    batch, _, _ = build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)
    trainer = response_logprobs(score(model, batch, sampling.temperature), batch)
    with pytest.raises(WeightSyncError, match="engine and trainer disagree"):
        check_logprobs([s.logprobs for s in samples], trainer, SyncCheckConfig().resolved("float32"))


def test_sleeping_engine_refuses_to_generate(setup, engine):
    requests = setup[3]
    engine.sleep()
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="partly asleep"):
        engine.generate(requests, SamplingParams(max_new_tokens=2))
    engine.wake_up(["kv_cache"])


def test_routed_experts_are_the_engines_own_routes(setup, engine):
    """return_routed_experts: [prompt + response - 1, moe_layers, top_k] per sample, equal to the
    routes of one teacher-forced forward over the whole sequence (prefill, image positions and
    decode steps line up), and each sample's metadata its own dict."""
    from megatron_vlm.rollout.embedded import moe_routers

    hf_config, _, _, requests, prepared = setup
    engine.return_routed_experts = True
    samples = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=5, n=2, seed=4,
                                                       stop_token_ids=[STOP]))
    layers = len(moe_routers(engine.model))
    assert layers == 3  # 4 layers, layer 0 dense
    for sample in samples[::3]:
        routes = sample.metadata["routed_experts"]
        tokens = len(sample.prompt_ids) + len(sample.response_ids)
        assert routes.shape == (tokens - 1, layers, 2) and routes.dtype == torch.int16
        prep = prepared[sample.request_id]
        recorded = []
        hooks = [g.register_forward_hook(lambda _m, _i, out: recorded.append(out[2]))
                 for g in moe_routers(engine.model)]
        ids = torch.tensor([sample.prompt_ids + sample.response_ids])
        types = torch.cat([prep.mm_token_type_ids, torch.zeros(len(sample.response_ids), dtype=torch.long)])
        extra = {} if prep.pixel_values is None else dict(pixel_values=prep.pixel_values,
                                                          image_grid_thw=prep.image_grid_thw)
        with torch.no_grad():
            engine.model(input_ids=ids, mm_token_type_ids=types[None], **extra)
        for hook in hooks:
            hook.remove()
        forced = torch.stack(recorded, dim=1)[:tokens - 1]  # [tokens - 1, layers, k]
        assert torch.equal(forced.sort(-1).values.to(torch.int16), routes.sort(-1).values)
    assert "routed_experts" not in requests[0].metadata


def test_a_forced_answers_merged_routes_are_the_routes_of_its_whole_sequence(setup, engine):
    """GLM-4.5V's forced answer under routing replay (trainer/grpo.py force_answers): a cut-off
    sample is re-submitted with the inserted delimiter and continued; merge_forced_routes keeps
    the first generation's routes and takes the rest from the continuation. The result is one
    route per token but the last of the merged sequence, equal to a teacher-forced forward's, and
    the trainer's batch takes it."""
    from dataclasses import replace

    from megatron_vlm.rollout.embedded import moe_routers
    from megatron_vlm.trainer.routing_replay import merge_forced_routes

    hf_config, _, _, requests, prepared = setup
    engine.return_routed_experts = True
    first = engine.generate(requests[:1], SamplingParams(temperature=1.0, max_new_tokens=4, n=1, seed=4))[0]
    inserted = [5, 6]  # the delimiter's ids
    prep = prepared[first.request_id]
    extra = torch.tensor(first.response_ids + inserted)
    prepared["r0/forced"] = replace(prep, input_ids=torch.cat([prep.input_ids, extra]),
                                    mm_token_type_ids=torch.cat([prep.mm_token_type_ids, torch.zeros_like(extra)]))
    try:
        continuation = RolloutRequest("r0/forced", requests[0].prompt_ids + first.response_ids + inserted)
        answer = engine.generate([continuation], SamplingParams(temperature=1.0, max_new_tokens=3, n=1, seed=5))[0]
    finally:
        del prepared["r0/forced"]
    ids = first.response_ids + inserted + answer.response_ids
    tokens = len(first.prompt_ids) + len(ids)
    merged = merge_forced_routes(first.metadata["routed_experts"], answer.metadata["routed_experts"], tokens)
    recorded = []
    hooks = [g.register_forward_hook(lambda _m, _i, out: recorded.append(out[2])) for g in moe_routers(engine.model)]
    with torch.no_grad():
        engine.model(input_ids=torch.tensor([first.prompt_ids + ids]),
                     mm_token_type_ids=torch.cat([prep.mm_token_type_ids, torch.zeros(len(ids), dtype=torch.long)])[None],
                     pixel_values=prep.pixel_values, image_grid_thw=prep.image_grid_thw)
    for hook in hooks:
        hook.remove()
    forced = torch.stack(recorded, dim=1)[:tokens - 1]
    assert merged.shape == forced.shape
    assert torch.equal(forced.sort(-1).values.to(torch.int16), merged.sort(-1).values)
    sample = replace(first, response_ids=ids, metadata={**first.metadata, "routed_experts": merged})
    batch, _, _ = build_batch([sample], prepared, pad_id=0, spatial_merge_size=2, with_routes=True)
    assert int((batch.routed_experts[0, :tokens - 1] >= 0).all()) == 1


def test_routed_experts_need_an_moe_model(single_rank_runtime):
    _, prepared = fixture_requests()
    with pytest.raises(ValueError, match="no MoE routers"):
        EmbeddedEngine(make_config("qwen3_vl"), prepare=lambda r: prepared[r.request_id], return_routed_experts=True)
