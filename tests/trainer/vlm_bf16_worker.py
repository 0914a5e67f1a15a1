"""One rank of the bf16 run (2 gloo ranks, EP=2): the digits demo's VLM run with
`runtime.params_dtype: bfloat16`, two SFT steps then one GRPO step with a k3 KL term, through the
run's own setup (`context.build_context`, the stage objects). Records the dtypes of the parameters, of the optimizer's main
params and Adam state, and of the reference policy; the losses; how far each step moved the params.

argv: OUT.json ASSETS (the small digits demo, written by test_bf16_run.py). GRPO rewards are a
function of the responses (the verifier would score a random model's answers all 0, ties that
train nothing): this run is about dtypes, not learning.
"""
import json
import math
import sys
from pathlib import Path

import torch

from megatron_vlm.config import load_config
from megatron_vlm.parallel.runtime import shutdown
from megatron_vlm.trainer.grpo import Rewards
from megatron_vlm.trainer.context import build_context
from megatron_vlm.trainer.stages import build_stage

ROOT = Path(__file__).resolve().parents[2]


def config(out: Path, assets: str):
    return load_config(ROOT / "configs" / "digits_demo.yaml", [
        f"vlm.assets={assets}", "vlm.build_demo_assets=false", "runtime.params_dtype=bfloat16",
        "stages=[{kind: sft, steps: 2, batch_size: 8}, {kind: grpo, steps: 1}]",
        "update.loss={name: dapo, kl_type: k3, kl_coef: 0.01}", "update.micro_batch_size=8",
        "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
        f"train.out_dir={out}", "vlm.export=false"])


def varied(samples):
    values = torch.tensor([len(s.response_ids) + sum(s.response_ids) % 7 / 10 for s in samples])
    return Rewards(values, values, {})


def dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).replace("torch.", "") for t in tensors})


def moved(model, before: dict) -> dict:
    """Largest |change| per part (language model, vision tower), max over ranks."""
    change = {"language": 0.0, "vision": 0.0}
    for name, param in model.named_parameters():
        part = "vision" if name.startswith("vision.") else "language"
        change[part] = max(change[part], float((param.float() - before[name].float()).abs().max()))
    values = torch.tensor([change["language"], change["vision"]])
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return {"language": values[0].item(), "vision": values[1].item()}


def optimizer_dtypes(optimizer) -> dict:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    main = [p for opt in inner for group in opt.optimizer.param_groups for p in group["params"]]
    state = [v for opt in inner for s in opt.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim() > 0]
    return {"optimizers": sorted({type(opt).__name__ for opt in inner}), "main_params": dtypes(main),
            "adam_state": dtypes(state), "main_param_count": len(main)}


def main():
    out_path, assets = Path(sys.argv[1]), sys.argv[2]
    cfg = config(out_path.parent / "run", assets)
    run = build_context(cfg)
    sft, grpo = (build_stage(stage, run) for stage in cfg.stages)
    model, report = run.actor.model, {}
    params = dict(model.named_parameters())
    report["language_params"] = dtypes(p for n, p in params.items() if not n.startswith("vision."))
    report["vision_params"] = dtypes(p for n, p in params.items() if n.startswith("vision."))
    report["all_params"] = dtypes(params.values())
    report["not_bf16"] = sorted(n for n, p in params.items() if p.dtype != torch.bfloat16)
    report["config"] = {"params_dtype": str(model.config.params_dtype), "bf16": model.config.bf16}
    before = {n: p.detach().clone() for n, p in params.items()}
    report["sft"] = [sft.step(step) for step in (1, 2)]
    report["sft_moved"] = moved(model, before)
    report["optimizer"] = optimizer_dtypes(run.actor.optimizer)
    run.actor.reference.reset_from(model)  # pi_ref = the policy entering the stage, as run() does
    report["reference_params"] = dtypes(run.actor.reference.model.parameters())
    report["reference_not_bf16"] = sorted(n for n, p in run.actor.reference.model.named_parameters()
                                          if p.dtype != torch.bfloat16)
    grpo.rewards = varied
    before = {n: p.detach().clone() for n, p in params.items()}
    grpo_metrics = grpo.step(1)
    report["grpo"] = {k: v for k, v in grpo_metrics.items() if isinstance(v, (int, float))}
    report["grpo_moved"] = moved(model, before)
    report["finite"] = all(math.isfinite(m["loss"]) for m in report["sft"] + [report["grpo"]])
    run.close()
    if run.runtime.rank == 0:
        out_path.write_text(json.dumps(report, indent=1, default=str))
    shutdown()


if __name__ == "__main__":
    main()
