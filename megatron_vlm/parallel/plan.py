"""The parallel plan of a run, computed from its config alone (no GPU, no process group).

Per-rank memory counts what megatron allocates for the model state, for the most loaded rank of
each pipeline stage:
  parameters   params_dtype bytes per element (bf16: 2, fp32: 4)
  gradients    4 bytes (megatron's DDP reduces gradients in fp32, grad_reduce_in_fp32=True)
  optimizer    Adam m and v in fp32 (8 bytes) plus an fp32 main copy for bf16 params (4 bytes),
               divided by the DP size (distributed optimizer): attention / dense params over DP,
               expert params over expert-DP.
Activations depend on sequence length and recomputation and are not included.

The model is `PlannedModel`: the `model:` section for the LM trainer; for a VLM run the HF config
the run builds from (RunConfig.planned_model), with its vision tower, which is replicated over TP
and lives on the first pipeline stage beside the embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_vlm.models.language import LanguageModelConfig


@dataclass
class PlannedModel:
    lm: LanguageModelConfig
    vision_params: int = 0        # the vision tower (dense, first stage, replicated over TP)
    source: str = "model:"        # where the shapes were read
    field_names: dict[str, str] = field(default_factory=dict)  # our field -> the source's name

    def check_layout(self, parallel) -> None:
        try:
            self.lm.check_layout(parallel, self.field_names)
        except ValueError as exc:
            if not self.field_names:
                raise
            raise ValueError(f"{exc} (the model's config: {self.source})") from None


@dataclass
class StageCount:
    stage: int
    layers: list[int]
    dense_params: int    # per rank: sharded over TP (replicated over DP)
    expert_params: int   # per rank: sharded over EP x ETP (replicated over expert-DP)


def layer_params(model: LanguageModelConfig, moe_layer: bool, tp: int, ep: int, etp: int):
    """(dense, expert) parameter counts of one transformer layer on one rank."""
    h, d = model.hidden_size, model.head_dim
    qkv = h * (model.num_attention_heads + 2 * model.num_query_groups) * d // tp
    if model.add_qkv_bias:
        qkv += (model.num_attention_heads + 2 * model.num_query_groups) * d // tp
    proj = model.num_attention_heads * d * h // tp
    norms = 2 * h + (2 * d if model.qk_layernorm else 0)
    dense = qkv + proj + norms
    if not moe_layer:
        return dense + 3 * h * model.ffn_hidden_size // tp, 0
    router = h * model.num_experts
    experts = (model.num_experts // ep) * 3 * h * model.moe_ffn_hidden_size // etp
    return dense + router, experts


def stage_counts(model: LanguageModelConfig, tp: int, pp: int, ep: int, etp: int) -> list[StageCount]:
    per_stage = model.num_layers // pp
    embedding = model.vocab_size * model.hidden_size // tp
    stages = []
    for stage in range(pp):
        layers = list(range(stage * per_stage, (stage + 1) * per_stage))
        dense = expert = 0
        for i in layers:
            d, e = layer_params(model, model.moe_layer_pattern[i] == 1, tp, ep, etp)
            dense, expert = dense + d, expert + e
        if stage == 0:
            dense += embedding
        if stage == pp - 1:
            dense += model.hidden_size  # final norm
            if not model.tie_word_embeddings or pp > 1:  # PP keeps a copy on the last stage
                dense += embedding
        stages.append(StageCount(stage, layers, dense, expert))
    return stages


def total_params(model: LanguageModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the unsharded model."""
    s = stage_counts(model, 1, 1, 1, 1)[0]
    total = s.dense_params + s.expert_params
    if model.num_experts is None:
        return total, total
    per_expert = 3 * model.hidden_size * model.moe_ffn_hidden_size
    moe_layers = sum(model.moe_layer_pattern)
    active = total - moe_layers * (model.num_experts - model.moe_router_topk) * per_expert
    return total, active


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _model_line(planned: PlannedModel) -> str:
    m = planned.lm
    total, active = total_params(m)
    total, active = total + planned.vision_params, active + planned.vision_params
    line = (f"model: {m.num_layers} layers, hidden {m.hidden_size}, "
            + (f"{m.num_experts} experts (top-{m.moe_router_topk}), " if m.num_experts else "dense, ")
            + f"{_count(total)} parameters, {_count(active)} active")
    if planned.vision_params:
        line += f" (vision tower {_count(planned.vision_params)})"
    return line + f"; from {planned.source}"


def format_plan(cfg, world_size: int) -> str:
    planned = cfg.planned_model()
    cfg.check(world_size, planned)
    p, m = cfg.parallel, planned.lm
    dp = p.data_parallel_size(world_size)
    edp = p.expert_data_parallel_size(world_size)
    param_bytes = 2 if cfg.runtime.params_dtype == "bfloat16" else 4
    lines = [f"world size {world_size}: {p.describe(world_size)}", _model_line(planned)]
    if m.num_experts:
        lines.append(f"experts: {m.num_experts} / EP {p.ep} = {m.num_experts // p.ep} per rank, "
                     f"expert TP {p.expert_tp}, dispatcher {p.token_dispatcher}")
    lines.append(f"sequence parallel: {p.use_sequence_parallel}; distributed optimizer: "
                 f"{p.distributed_optimizer}; micro-batches per step per DP rank: "
                 f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)}")
    lines.append(f"{'stage':>5} {'layers':>9} {'params/rank':>12} {'weights GiB':>12} "
                 f"{'grads GiB':>10} {'optim GiB':>10} {'total GiB':>10}")
    gib = 1024 ** 3
    for s in stage_counts(m, p.tp, p.pp, p.ep, p.expert_tp):
        if s.stage == 0:
            s.dense_params += planned.vision_params
        n = s.dense_params + s.expert_params
        weights = n * param_bytes / gib
        grads = n * 4 / gib
        state_bytes = 8 + (4 if param_bytes == 2 else 0)
        shards = (dp, edp) if p.distributed_optimizer else (1, 1)
        optim = (s.dense_params / shards[0] + s.expert_params / shards[1]) * state_bytes / gib
        layers = f"{s.layers[0]}-{s.layers[-1]}"
        lines.append(f"{s.stage:>5} {layers:>9} {n / 1e6:>11.2f}M {weights:>12.2f} {grads:>10.2f} "
                     f"{optim:>10.2f} {weights + grads + optim:>10.2f}")
    return "\n".join(lines)
