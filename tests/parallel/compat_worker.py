"""One rank of a run with every CPU patch but one: runs the scenario that reaches that megatron site.

Usage: compat_worker.py SITE OUT_PREFIX. Writes OUT_PREFIX.<rank>.json with the error raised (or
none) and exits 3 when the scenario failed, so the launcher stops the other ranks.
"""
import json
import os
import sys
import traceback

import torch

from megatron_vlm.models.language import LanguageModelConfig, build_language_model, transformer_config
from megatron_vlm.parallel import cpu_compat
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.megatron_step import build_optimizer, forward_backward, wrap_ddp

MODEL = LanguageModelConfig(num_layers=2, dense_layers=[0])
TIED = LanguageModelConfig(num_layers=2, num_experts=None, tie_word_embeddings=True)

# site -> (parallel layout, what to run)
SCENARIOS = {
    "current_device": (dict(), "forward"),
    "cuda_synchronize": (dict(pp=2), "train"),
    "rng_tracker": (dict(), "init"),
    "te_general_gemm": (dict(), "forward"),
    "alltoall_dispatcher": (dict(token_dispatcher="alltoall"), "forward"),
    "uneven_collectives": (dict(tp=2, ep=2, etp=2), "forward"),
    "cuda_factories": (dict(), "train"),
    "rope_cp": (dict(cp=2), "forward"),
    "cuda_type_names": (dict(), "train_distopt"),
    "tied_embedding_sync": (dict(pp=2), "build_tied"),
}


def run(site):
    layout, action = SCENARIOS[site]
    parallel = ParallelConfig(**layout)
    runtime = init_runtime(parallel, seed=3, cpu_patches=set(cpu_compat.PATCHES) - {site})
    if action == "init":
        return
    model_cfg = TIED if action == "build_tied" else MODEL
    config = transformer_config(model_cfg, parallel, "cpu", calculate_per_token_loss=True)
    model = build_language_model(model_cfg, config, "cpu")
    if action == "build_tied":
        return
    seq = 16
    g = torch.Generator().manual_seed(runtime.rank // (parallel.tp * parallel.cp))
    tokens = torch.randint(0, MODEL.vocab_size, (1, seq), generator=g)
    from megatron_vlm.parallel.batching import split_for_cp
    from megatron.core import parallel_state as ps
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, seq),
             "position_ids": torch.arange(seq)[None]}
    batch = {k: split_for_cp(v, cp, cp_rank) for k, v in batch.items()}
    if action == "forward":
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()
        return
    ddp = wrap_ddp(model, distributed_optimizer=action == "train_distopt")
    optimizer, _ = build_optimizer([ddp], OptimConfig(), action == "train_distopt", total_steps=1)
    forward_backward([ddp], [batch])
    optimizer.step()


def main():
    site, prefix = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", 0))
    error = None
    try:
        run(site)
    except BaseException as exc:  # the point is to see what the site raises
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump({"site": site, "error": error}, f)
    sys.stdout.flush()
    os._exit(3 if error else 0)


if __name__ == "__main__":
    main()
