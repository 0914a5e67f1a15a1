"""One rank of the equivalence launch: every named layout against the unsharded model.

Started N times by test_equivalence.py (one launch checks several layouts: process start-up is the
expensive part here). The reference is the same megatron model at TP=PP=CP=EP=1 with every rank
running the whole global batch (DP all-reduce of identical gradients divided by the doubled token
count is exact), so reference and layouts go through the same DDP, optimizer and schedule code.
For each layout, built from the reference weights cut with checkpoint/sharding.py:
  logits      forward-only through the schedule, gathered over TP (vocab) and CP (sequence)
  loss        token mean over the global batch
  grads       megatron DDP main_grad after finalize_model_grads vs the cut reference gradient
  params      after one Adam step with gradient clipping, plain DDP and distributed optimizer
  counts      this rank's parameter count equals the planner's (parallel/plan.py)
Writes the maxima over ranks as JSON to argv[1].
"""
import json
import sys

import torch

from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict, shard_state_dict
from megatron_vlm.models.language import LanguageModelConfig, build_language_model, transformer_config
from megatron_vlm.parallel.batching import local_batch, merge_from_cp
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.plan import stage_counts
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.megatron_step import build_optimizer, forward_backward, wrap_ddp

LAYOUTS = {
    "tp2_sp": dict(tp=2),
    "ep2_alltoall": dict(ep=2, token_dispatcher="alltoall"),
    "ep2_allgather": dict(ep=2, token_dispatcher="allgather"),
    "pp2_1f1b": dict(pp=2),
    "cp2": dict(cp=2),
    "tp2_ep2": dict(tp=2, ep=2, etp=1),
    "pp2_tp2": dict(pp=2, tp=2),
    "cp2_tp2": dict(cp=2, tp=2),
    "ep2_etp2_alltoall": dict(ep=2, etp=2, tp=2),
    "dp4": dict(),
    # tied input/output embeddings split over pipeline stages: megatron all-reduces their grads
    "pp2_tied": dict(pp=2, model="tied"),
}

MODELS = {
    "moe": LanguageModelConfig(vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4,
                               num_query_groups=2, head_dim=16, ffn_hidden_size=96, num_experts=4,
                               moe_ffn_hidden_size=48, moe_router_topk=2, dense_layers=[0]),
    "tied": LanguageModelConfig(vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4,
                                num_query_groups=2, head_dim=16, ffn_hidden_size=96,
                                num_experts=None, tie_word_embeddings=True),
}
MODEL = MODELS["moe"]
OPTIM = OptimConfig(lr=1e-2, clip_grad=0.5, adam_eps=1e-3)
BATCH, SEQ = 4, 16


def make_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[1, :5] = 0  # uneven token counts per sample: normalisation must be global
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


def build(model_cfg, parallel, distributed_optimizer, full_state=None):
    config = transformer_config(model_cfg, parallel, "cpu", calculate_per_token_loss=True)
    model = build_language_model(model_cfg, config, "cpu")
    if full_state is not None:
        load_full_state_dict(model, full_state, RankLayout.current(config),
                             model_cfg.tie_word_embeddings)
    ddp = wrap_ddp(model, distributed_optimizer)
    optimizer, scheduler = build_optimizer([ddp], OPTIM, distributed_optimizer, total_steps=1)
    return model, ddp, optimizer


def microbatches(batch):
    local = local_batch(batch)
    return [{k: v[i:i + 1] for k, v in local.items()} for i in range(local["tokens"].shape[0])]


def logits_step(data_iterator, model):
    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], None)

    def collect(output):
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": output.detach()}

    return logits, collect


def gathered_logits(ddp, mbs):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=logits_step, data_iterator=iter(mbs), model=[ddp],
        num_microbatches=len(mbs), seq_length=mbs[0]["tokens"].shape[1], micro_batch_size=1,
        forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = torch.cat([o["logits"] for o in out], dim=0)  # [b_local, s_local, V/tp]
    tp_pieces = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(tp_pieces, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    logits = torch.cat(tp_pieces, dim=-1)
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        cp_pieces = [torch.empty_like(logits) for _ in range(cp)]
        torch.distributed.all_gather(cp_pieces, logits.contiguous(), group=ps.get_context_parallel_group())
        logits = merge_from_cp(cp_pieces, seq_dim=1)
    return logits


def run_reference(runtime, batch, model_cfg):
    set_layout(runtime, ParallelConfig(), seed=7)
    model, ddp, optimizer = build(model_cfg, ParallelConfig(), False)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    for tensor in full.values():  # every rank must start from rank 0's weights
        torch.distributed.broadcast(tensor, src=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full[n])
    mbs = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(BATCH)]
    logits = gathered_logits(ddp, mbs)
    loss = forward_backward([ddp], mbs)["loss"]
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(state=full, logits=logits, loss=loss, grads=grads, after=after)


def rel_err(local: dict, ref_cut: dict) -> tuple[float, float]:
    diff = sum(float((local[n] - ref_cut[n]).double().pow(2).sum()) for n in local)
    norm = sum(float(ref_cut[n].double().pow(2).sum()) for n in local)
    max_abs = max(float((local[n] - ref_cut[n]).abs().max()) for n in local)
    return max_abs, (diff / max(norm, 1e-30)) ** 0.5


def run_layout(runtime, name, ref, batch, model_cfg):
    from megatron.core import parallel_state as ps

    layout_kwargs = {k: v for k, v in LAYOUTS[name].items() if k != "model"}
    parallel = ParallelConfig(**layout_kwargs)
    runtime = set_layout(runtime, parallel, seed=7)
    tied = model_cfg.tie_word_embeddings
    result = {}
    for dist_opt in (False, True):
        model, ddp, optimizer = build(model_cfg, parallel, dist_opt, ref["state"])
        layout = RankLayout.current(model.config)
        stage = stage_counts(model_cfg, parallel.tp, parallel.pp, parallel.ep,
                             parallel.expert_tp)[ps.get_pipeline_model_parallel_rank()]
        result["param_count_mismatch"] = abs(sum(p.numel() for p in model.parameters())
                                             - stage.dense_params - stage.expert_params)
        mbs = microbatches(batch)
        if not dist_opt:
            logits = gathered_logits(ddp, mbs)
            if logits is not None:
                dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
                expected = ref["logits"].chunk(dp, dim=0)[dp_rank]
                result["logits_max_abs"] = float((logits - expected).abs().max())
        metrics = forward_backward([ddp], mbs)
        result["loss_abs_diff"] = abs(metrics["loss"] - ref["loss"])
        if not dist_opt:
            grads = {n: p.main_grad for n, p in model.named_parameters()}
            ref_grads = shard_state_dict(ref["grads"], model, layout, tied)
            result["grad_max_abs"], result["grad_rel_err"] = rel_err(grads, ref_grads)
        optimizer.step()
        params = {n: p.detach() for n, p in model.named_parameters()}
        key = "distopt" if dist_opt else "ddp"
        result[f"param_{key}_max_abs"], _ = rel_err(params, shard_state_dict(ref["after"], model, layout, tied))
    return result


def main():
    out_path, names = sys.argv[1], sys.argv[2].split(",")
    runtime = init_runtime(ParallelConfig(), seed=7)
    batch = make_batch()
    refs = {}
    report = {}
    for name in names:
        model_name = LAYOUTS[name].get("model", "moe")
        if model_name not in refs:
            refs[model_name] = run_reference(runtime, batch, MODELS[model_name])
        local = run_layout(runtime, name, refs[model_name], batch, MODELS[model_name])
        keys = ["logits_max_abs", "loss_abs_diff", "grad_max_abs", "grad_rel_err",
                "param_ddp_max_abs", "param_distopt_max_abs", "param_count_mismatch"]
        values = torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        report[name] = dict(zip(keys, values.tolist()))
    if runtime.rank == 0:
        report["_reference_loss"] = {k: r["loss"] for k, r in refs.items()}
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
