"""Supervised training of the MoE language model on generated data, on any parallel layout.

The job the foundation can run end to end before the RL loop exists: the loss goes down and the
held-out answer accuracy (teacher-forced exact match of every answer token) goes up, on CPU ranks
with a real layout (EP=2 by default in configs/lm_demo.yaml).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_vlm.data.arithmetic import ArithmeticTask
from megatron_vlm.models.language import build_language_model, transformer_config
from megatron_vlm.parallel.batching import local_batch
from megatron_vlm.parallel.runtime import init_runtime, shutdown
from megatron_vlm.trainer.megatron_step import build_optimizer, forward_backward, train_step, wrap_ddp
from megatron_vlm.trainer.run_log import refuse_foreign_outputs


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    n = batch["tokens"].shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()}
            for i in range(0, n, micro_batch_size)]


def answer_accuracy_step(data_iterator, model):
    """Forward step whose 'loss' is (exactly matched answers, answers) for the schedule."""
    from megatron.core import parallel_state as ps

    mb = next(data_iterator)
    logits = model(mb["tokens"], mb["position_ids"], None)  # [b, s, V/tp]

    def count(output):
        pieces = [torch.empty_like(output) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(pieces, output.contiguous(),
                                     group=ps.get_tensor_model_parallel_group())
        predicted = torch.cat(pieces, dim=-1).argmax(-1)
        mask = mb["loss_mask"].bool()
        wrong = ((predicted != mb["labels"]) & mask).any(-1)
        report = torch.stack([(~wrong).sum().float(), wrong.new_tensor(len(wrong), dtype=torch.float)])
        return output.sum() * 0, wrong.new_ones((), dtype=torch.int), {"lm loss": report}

    return logits, count


def run(cfg, overwrite: bool = False) -> list[dict]:
    """The LM demo: no checkpoints (it runs in seconds); a second run into the same out_dir
    needs `overwrite`, like the VLM run's."""
    if not overwrite:
        refuse_foreign_outputs(Path(cfg.train.out_dir))
    runtime = init_runtime(cfg.parallel, cfg.runtime.seed, cfg.runtime.device)
    cfg.check(runtime.world_size)
    task = ArithmeticTask(cfg.train.seq_length, cfg.data.max_operand, seed=cfg.runtime.seed)
    if cfg.model.vocab_size < task.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the task's "
                         f"vocabulary ({task.vocab_size})")
    dtype = torch.bfloat16 if cfg.runtime.params_dtype == "bfloat16" else torch.float32
    config = transformer_config(cfg.model, cfg.parallel, runtime.device.type, dtype,
                                cfg.runtime.backend, calculate_per_token_loss=True)
    model = build_language_model(cfg.model, config, runtime.device.type)
    ddp = wrap_ddp(model, cfg.parallel.distributed_optimizer)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.parallel.distributed_optimizer,
                                           cfg.train.steps)
    out_dir = Path(cfg.train.out_dir)
    log = _Logger(out_dir, runtime.rank == 0)
    log.info(f"{runtime.world_size} ranks on {runtime.device.type}: "
             f"{cfg.parallel.describe(runtime.world_size)}")
    history = []
    for step in range(1, cfg.train.steps + 1):
        start = time.perf_counter()
        batch = local_batch(task.batch(cfg.train.global_batch_size, step))
        metrics = train_step([ddp], optimizer, scheduler,
                             split_microbatches(batch, cfg.train.micro_batch_size))
        metrics.update(step=step, step_seconds=time.perf_counter() - start)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps or step == 1:
            metrics.update(evaluate([ddp], task, cfg))
        history.append(metrics)
        if step % cfg.train.log_every == 0 or "eval_loss" in metrics:
            log.metrics(metrics)
    log.close()
    shutdown()
    return history


def evaluate(model_chunks, task, cfg) -> dict:
    batch = local_batch(task.batch(cfg.data.eval_samples, step=0, held_out=True))
    mbs = split_microbatches(batch, cfg.train.micro_batch_size)
    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        loss = forward_backward(model_chunks, mbs, forward_only=True)["loss"]
        accuracy = forward_backward(model_chunks, mbs, forward_only=True,
                                    forward_step=answer_accuracy_step)["loss"]
    for chunk in model_chunks:
        chunk.train()
    return {"eval_loss": loss, "eval_accuracy": accuracy}


class _Logger:
    """Progress lines on stdout and metrics as JSON lines, from rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.jsonl", "w")

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def metrics(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        extra = ""
        if "eval_loss" in metrics:
            extra = f" | held-out loss {metrics['eval_loss']:.3f} acc {metrics['eval_accuracy']:.3f}"
        print(f"step {metrics['step']:>5} loss {metrics['loss']:.4f} grad_norm "
              f"{metrics['grad_norm']:.3f} lr {metrics['lr']:.2e} "
              f"{metrics['step_seconds'] * 1e3:.0f} ms{extra}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
