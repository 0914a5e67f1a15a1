"""One rank of the packed-path equivalence launch (2 gloo ranks, several layouts in one launch).

Reference: transformers' own model run on each sample alone, full [S, V] logits, log_softmax, the
registered loss (or the NLL) over all samples with the global normaliser, autograd gradients.
Under test: the trainer's packed THD micro-batches (several per rank, planned by plan_packs), the
hidden-state head (`return_hidden`), `fused_linear_policy_loss` / `linear_logprobs`, megatron's
schedule and DDP, for each layout from the same weights:
- score_rows: log-probs of every real token;
- update (dapo with k3 KL: fused one-pass; gspo: fused two-pass; intern_s1: linear_logprobs +
  policy_loss_fn) and sft_step: loss, entropy, and the gradient. The optimizer is plain SGD
  (no momentum, no clipping) with a large rate, so gradient = (before - after) / LR in HF layout;
- an SFT step on a single row, so that one DP rank has no sample and runs a masked row.
Writes the worst differences per layout and case as JSON (rank 0).
"""
import json
import sys

import torch

from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.streaming import iter_hf_weights
from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.rl.losses import LossConfig, LossInputs, kernel_policy_config, policy_loss_fn
from megatron_vlm.rl.rollout_correction import CorrectionInputs, RolloutCorrectionConfig, rollout_correction_fn
from megatron_vlm.rollout.protocol import RolloutSample
from megatron_vlm.trainer.actor_batch import build_batch
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.trainer.rl_step import aggregation_units, make_microbatches, score_rows, update
from megatron_vlm.trainer.sft import sft_step
from tests.models.vlm_fixtures import make_hf_model
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_sgd_policy

# layout -> its parallel config and the cases it runs (PP=2 only one of each head path, for time)
ALL_CASES = ("dapo_k3", "gspo", "intern_s1", "sft", "sft_one_row")
LAYOUTS = {"tp2_sp": (dict(tp=2), ALL_CASES), "ep2_dp2": (dict(ep=2, etp=1), ALL_CASES),
           "pp2": (dict(pp=2), ("dapo_k3", "intern_s1", "sft")),
           # context parallelism: every sample cut into 2*CP chunks, sequence sums over the CP group
           "cp2": (dict(cp=2), ALL_CASES + ("dapo_seq_mean", "dapo_seq_tis")),
           "cp2_tp2": (dict(cp=2, tp=2), ("dapo_k3", "gspo", "intern_s1", "sft")),    # 4 ranks
           "cp2_ep2": (dict(cp=2, ep=2, etp=1), ("dapo_k3", "gspo", "sft"))}          # 4 ranks
TEMPERATURE = 0.9
LR = 100.0       # SGD: after = before - LR * grad; a large rate keeps (before - after) / LR precise in fp32
PACK_TOKENS = 64  # samples are 10-35 tokens: several packs per rank, several samples per pack
CASES = {
    "dapo_k3": LossConfig(name="dapo", kl_type="k3", kl_coef=0.1),
    "gspo": LossConfig(name="gspo", eps_low=0.2, eps_high=0.28),  # paper's 3e-4 would clip everything
    "intern_s1": LossConfig(name="intern_s1"),
    # a sequence-level aggregation and a sequence-level rollout correction: under CP both need
    # whole-sequence sums across the ranks' chunks
    "dapo_seq_mean": LossConfig(name="dapo", aggregation="seq-mean-token-mean"),
    "dapo_seq_tis": LossConfig(name="dapo"),
}
CORRECTIONS = {"dapo_seq_tis": RolloutCorrectionConfig(name="seq_tis", clip=1.5)}


def make_batch():
    requests, prepared = fixture_requests()
    g = torch.Generator().manual_seed(4)
    response_lengths = [7, 3, 9, 0, 5, 8, 2, 6]
    samples = []
    for i, n in enumerate(response_lengths):
        request = requests[i % len(requests)]
        response = torch.randint(0, 180, (n,), generator=g).tolist()
        prompt = prepared[request.request_id].input_ids.tolist()  # expanded, as the engine returns it
        samples.append(RolloutSample(request_id=request.request_id, index=i, prompt_ids=prompt,
                                     response_ids=response, logprobs=[0.0] * n, finish_reason="stop",
                                     seconds=0.0))
    return build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)


def hf_logprobs(hf, batch, images, patches, temperature):
    """Per row: (log-probs, entropy) [n] of transformers' model on that sample alone."""
    out = []
    for r, n in enumerate(batch.row_lengths()):
        row = batch.select(slice(r, r + 1), images, patches)
        kwargs = dict(input_ids=row.input_ids[:, :n], mm_token_type_ids=row.mm_token_type_ids[:, :n])
        if row.pixel_values is not None:
            kwargs.update(pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw)
        logp_all = torch.log_softmax(hf(**kwargs).logits[0].float() / temperature, dim=-1)
        out.append((logp_all.gather(1, row.labels[0, :n, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)))
    return out


def packed(batch, per_row):
    return torch.cat([per_row[r, :n] for r, n in enumerate(batch.row_lengths())])


def reference(hf, batch, images, patches, case, old, adv, ref, engine=None):
    """(loss, entropy token mean, {hf name: grad}) of the full batch."""
    hf.zero_grad()
    lengths = batch.row_lengths()
    cu = torch.tensor([0] + lengths).cumsum(0)
    mask = packed(batch, batch.loss_mask)
    per_row = hf_logprobs(hf, batch, images, patches, 1.0 if case == "sft" else TEMPERATURE)
    logprobs = torch.cat([lp for lp, _ in per_row])
    entropy = torch.cat([e for _, e in per_row]).detach()
    if case == "sft":
        loss = -(logprobs * mask).sum() / mask.sum()
    else:
        cfg = CASES[case]
        kcfg = kernel_policy_config(cfg)
        mode = kcfg.aggregation if kcfg is not None else "token-mean"
        units = aggregation_units(mask, cu, mode)
        is_weight = None
        if case in CORRECTIONS:
            is_weight, _ = rollout_correction_fn(CorrectionInputs(packed(batch, old), packed(batch, engine), mask, cu),
                                                 CORRECTIONS[case])
        loss, _ = policy_loss_fn(LossInputs(logprobs, packed(batch, old), packed(batch, adv), mask, cu,
                                            ref_logprobs=packed(batch, ref), normalizer=units,
                                            is_weight=is_weight), cfg)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf.named_parameters() if p.grad is not None}
    return float(loss.detach()), float((entropy * mask).sum() / mask.sum()), grads


def build(family, hf, full, parallel, runtime):
    set_layout(runtime, parallel, seed=5)
    return build_sgd_policy(family, hf, full, parallel, LR)


def grad_error(model, rules, before, expected):
    """max |(before - after) / LR - expected| over every tensor, and max |expected|."""
    worst = 0.0
    for name, after in iter_hf_weights(model, rules):
        grad = (before[name] - after) / LR
        if grad.shape != expected[name].shape:  # fused experts: the Hub layout is the transpose
            grad = grad.transpose(-1, -2)
        worst = max(worst, float((grad - expected[name]).abs().max()))
    return worst, max(float(g.abs().max()) for g in expected.values())


def main():
    out_path = sys.argv[1]
    runtime = init_runtime(ParallelConfig(), seed=5)
    hf = make_hf_model("qwen3_vl_moe", seed=2)
    hf.config.text_config.router_aux_loss_coef = 0.0  # the aux loss depends on how tokens are grouped
    family = family_for(hf.config)
    rules = family.hf_rules(hf.config)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    full = dict(hf_to_mcore(rules, before.__getitem__))
    batch, images, patches = make_batch()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        ref_lp = [lp for lp, _ in hf_logprobs(hf, batch, images, patches, TEMPERATURE)]
    expected_lp = torch.zeros_like(batch.loss_mask)
    for r, lp in enumerate(ref_lp):
        expected_lp[r, :len(lp)] = lp
    noise = lambda scale: torch.randn(batch.loss_mask.shape, generator=g) * scale * batch.loss_mask  # noqa: E731
    old = expected_lp * batch.loss_mask + noise(0.3)   # ratios spread around 1: some tokens clip
    ref = expected_lp * batch.loss_mask + noise(0.2)
    adv = torch.randn(batch.loss_mask.shape[0], 1, generator=g) * batch.loss_mask
    engine = old + noise(0.1)  # the rollout engine's log-probs, off the trainer's
    references = {case: reference(hf, batch, images, patches, case, old, adv, ref, engine) for case in [*CASES, "sft"]}
    one_row = batch.select(slice(1, 2), images, patches)
    one_images = images[1:2]
    one_patches = patches[images[0]:images[0] + images[1]]
    references["sft_one_row"] = reference(hf, one_row, one_images, one_patches, "sft", None, None, None)

    report = {"tokens": int(sum(batch.row_lengths())), "loss_tokens": int(batch.loss_mask.sum())}
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["tp2_sp", "ep2_dp2", "pp2"]
    for name in names:
        layout, cases = LAYOUTS[name]
        parallel = ParallelConfig(**layout)
        figures = report[name] = {}
        for case in cases:
            ref_loss, ref_entropy, ref_grads = references[case]
            model, ddp, optimizer, scheduler = build(family, hf, full, parallel, runtime)
            if case == cases[0]:  # every case starts from these weights
                before_hf = dict(iter_hf_weights(model, rules))
                rows = list(range(batch.input_ids.shape[0]))
                packs = make_microbatches(batch, images, patches, rows, PACK_TOKENS, None, None, None, model.config)
                figures["samples_per_pack"] = [len(mb["batch"].rows) for mb in packs]
                trainer_lp = score_rows(model, batch, images, patches, TEMPERATURE, micro_batch_size=1,
                                        pack_tokens=PACK_TOKENS)
                real = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
                for r, n in enumerate(batch.row_lengths()):
                    real[r, :n] = True
                figures["logprobs_max_abs"] = float((trainer_lp - expected_lp)[real].abs().max())
            if case in CASES:
                cfg = UpdateConfig(temperature=TEMPERATURE, loss=CASES[case], pack_tokens=PACK_TOKENS,
                                   rollout_correction=CORRECTIONS.get(case))
                metrics = update([ddp], optimizer, scheduler, batch, images, patches, old, adv, cfg,
                                 ref_logprobs=ref, engine_logprobs=engine)
            elif case == "sft":
                metrics = sft_step([ddp], optimizer, scheduler, batch, images, patches, 1, pack_tokens=PACK_TOKENS)
            else:
                metrics = sft_step([ddp], optimizer, scheduler, one_row, one_images, one_patches, 1)
            worst, scale = grad_error(model, rules, before_hf, ref_grads)
            ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))
            figures[case] = dict(loss=metrics["loss"], ref_loss=ref_loss, grad_max_abs_err=worst,
                                 grad_max_abs=scale, grad_norm=metrics["grad_norm"], ref_grad_norm=ref_norm)
            if "entropy" in metrics:
                figures[case].update(entropy=metrics["entropy"], ref_entropy=ref_entropy)
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
