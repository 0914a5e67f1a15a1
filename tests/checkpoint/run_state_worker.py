"""One rank of the run_state launches (test_run_state.py): save, resume, and resume on another layout.

argv: OUT.json PHASE ROOT
  train    (2 ranks, EP=2) per case: 2 steps, save ROOT/<case>/step-2, 2 more steps; records losses,
           RNG draws made right after the save, and this rank's final params (ROOT/<case>/ref-r.pt)
  resume   (2 ranks, EP=2) per case: a fresh model from other weights, load, the same draws and 2
           steps: losses, draws and final params must equal the uninterrupted run's bit for bit;
           then, in the same launch, the layout changes' second halves: TP1 x EP2 ("b") and
           PP2 x EP1 ("c") load ROOT/layout/saved, save it again at once
           (ROOT/layout/reloaded_<b|c>), step 3, save ROOT/layout/after_<b|c>; the test compares
           the checkpoints' full tensors
  layout_a (4 ranks, TP2 x EP2, before `resume`) 2 steps, save ROOT/layout/saved, step 3, save
           ROOT/layout/after_a
Cases: distributed optimizer and megatron's non-distributed ChainedOptimizer path, fp32 and bf16
(Float16OptimizerWithFloat16Params / the distributed optimizer's fp32 main shards).
"""
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megatron_vlm.checkpoint.run_state import find_checkpoint, load_checkpoint, save_checkpoint
from megatron_vlm.config import OptimConfig
from megatron_vlm.models.language import LanguageModelConfig, build_language_model, transformer_config
from megatron_vlm.parallel.batching import local_batch
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.trainer.megatron_step import build_optimizer, train_step, wrap_ddp

MODEL = LanguageModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4,
                            num_query_groups=2, head_dim=16, ffn_hidden_size=96, num_experts=4,
                            moe_ffn_hidden_size=48, moe_router_topk=2, dense_layers=[0])
# warm-up then cosine decay: the scheduler's step count matters for every step's lr
OPTIM = OptimConfig(lr=1e-2, clip_grad=0.5, adam_eps=1e-3, warmup_steps=2, decay_style="cosine",
                    weight_decay=0.01)
TOTAL_STEPS = 6
CASES = {"distopt_fp32": (True, torch.float32), "chained_fp32": (False, torch.float32),
         "distopt_bf16": (True, torch.bfloat16), "chained_bf16": (False, torch.bfloat16)}
BATCH, SEQ = 4, 16


def batch(step: int) -> list[dict]:
    """Step `step`'s micro-batches of this DP rank (a different global batch every step)."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
    full = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, SEQ),
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}
    local = local_batch(full)
    return [{k: v[i:i + 1] for k, v in local.items()} for i in range(local["tokens"].shape[0])]


def build(parallel: ParallelConfig, distributed_optimizer: bool, dtype, seed: int):
    """Model (weights seeded by `seed`), DDP, optimizer, scheduler, and a second model standing in
    for the reference policy (its weights halved, so they differ from the policy's)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    config = transformer_config(MODEL, parallel, "cpu", dtype, calculate_per_token_loss=True)
    model = build_language_model(MODEL, config, "cpu")
    reference = build_language_model(MODEL, config, "cpu")
    with torch.no_grad():
        for param in reference.parameters():
            param.mul_(0.5)
    ddp = wrap_ddp(model, distributed_optimizer)
    optimizer, scheduler = build_optimizer([ddp], OPTIM, distributed_optimizer, TOTAL_STEPS)
    return model, ddp, optimizer, scheduler, reference


def draws() -> list[float]:
    """One draw from every generator the checkpoint restores."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(1).item()
    return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracked]


def save(root, tag, run, step, keep=2):
    model, ddp, optimizer, scheduler, reference = run
    return save_checkpoint(root, tag, model_chunks=[ddp], optimizer=optimizer, scheduler=scheduler,
                           extra_models={"reference": [reference]},
                           rank_state={"rank": torch.distributed.get_rank(), "step": step},
                           run_state={"step": step, "stage": {"kind": "sft", "seen": torch.arange(3)}},
                           config={"optim": vars(OPTIM)}, keep=keep)


def load(path, run):
    _, ddp, optimizer, scheduler, reference = run
    return load_checkpoint(path, model_chunks=[ddp], optimizer=optimizer, scheduler=scheduler,
                           extra_models={"reference": [reference]})


def steps(run, first: int, last: int) -> list[float]:
    _, ddp, optimizer, scheduler, _ = run
    return [train_step([ddp], optimizer, scheduler, batch(s))["loss"] for s in range(first, last + 1)]


def params(run) -> dict:
    model, _, optimizer, _, reference = run
    out = {f"model/{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"reference/{n}": p.detach().clone() for n, p in reference.named_parameters()})
    out["lr"] = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)
    return out


def phase_train(runtime, root: Path) -> dict:
    parallel = ParallelConfig(ep=2)
    set_layout(runtime, parallel, seed=7)
    report = {}
    for case, (dist_opt, dtype) in CASES.items():
        run = build(parallel, dist_opt, dtype, seed=11)
        first = steps(run, 1, 2)
        start = time.perf_counter()
        path = save(root / case, "step-2", run, 2)
        seconds = time.perf_counter() - start
        record = {"draws": draws(), "losses": steps(run, 3, 4), "first_losses": first}
        torch.save(params(run), root / case / f"ref-{runtime.rank}.pt")
        report[case] = {**record, "save_seconds": seconds, "path": str(path)}
    return report


def phase_resume(runtime, root: Path) -> dict:
    parallel = ParallelConfig(ep=2)
    set_layout(runtime, parallel, seed=7)
    report = {}
    for case, (dist_opt, dtype) in CASES.items():
        run = build(parallel, dist_opt, dtype, seed=12)  # other weights: the load must replace them
        path = find_checkpoint(root / case, "auto")
        start = time.perf_counter()
        run_state, rank_state = load(path, run)
        seconds = time.perf_counter() - start
        record = {"draws": draws(), "losses": steps(run, 3, 4)}
        expected = torch.load(root / case / f"ref-{runtime.rank}.pt", weights_only=True)
        got = params(run)
        mismatch = [k for k in expected if not torch.equal(expected[k], got[k])]
        flags = torch.tensor([len(mismatch)], dtype=torch.float64)
        torch.distributed.all_reduce(flags)
        report[case] = {**record, "load_seconds": seconds, "mismatched_tensors": flags.item(),
                        "mismatch_examples": mismatch[:3], "run_state_step": run_state["step"],
                        "run_state_seen": run_state["stage"]["seen"].tolist(),
                        "rank_state_ok": rank_state == {"rank": runtime.rank, "step": 2}}
    return report


def phase_layout(runtime, root: Path, parallel: ParallelConfig, name: str) -> dict:
    """Layout "a" trains 2 steps and saves root/saved; any other loads root/saved and saves it
    again at once (root/reloaded_<name>). Then step 3, saved as root/after_<name>."""
    set_layout(runtime, parallel, seed=7)
    run = build(parallel, True, torch.float32, seed=11 if name == "a" else 12)
    report = {}
    if name == "a":
        report["first_losses"] = steps(run, 1, 2)
        save(root, "saved", run, 2, keep=10)
    else:
        run_state, rank_state = load(root / "saved", run)
        report["rank_state_is_none"] = rank_state is None
        report["run_state_step"] = run_state["step"]
        save(root, f"reloaded_{name}", run, 2, keep=10)
    report["step3_loss"] = steps(run, 3, 3)[0]
    save(root, f"after_{name}", run, 3, keep=10)
    return report


def main():
    out_path, phase, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    runtime = init_runtime(ParallelConfig(), seed=7)
    if phase == "train":
        report = phase_train(runtime, root)
    elif phase == "resume":  # one launch for every 2-rank load: process start-up is the cost
        report = {"resume": phase_resume(runtime, root),
                  "layout_b": phase_layout(runtime, root / "layout", ParallelConfig(ep=2), "b"),
                  "layout_c": phase_layout(runtime, root / "layout", ParallelConfig(pp=2), "c")}
    else:
        report = phase_layout(runtime, root / "layout", ParallelConfig(tp=2, ep=2, etp=1), "a")
    if runtime.rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
