"""The trainer's update path (one gloo rank in this process, several packed micro-batches) against
closed forms: the reported loss of every aggregation mode equals the aggregation of the per-token
losses over the whole batch, and a rollout-correction weight reaches the PG gradient exactly as
its formula says (fused head path: dapo; torch path: cispo).

The policy's log-probs before the step are `score_rows`'s (the same packs, the same model), so
the closed forms are computed from them on the host. The optimizer is plain SGD without momentum
or clipping: a parameter's change is -LR x its gradient, which makes gradients comparable across
updates built from the same weights."""
import math

import pytest
import torch

from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rl.rollout_correction import RolloutCorrectionConfig
from megatron_vlm.trainer.rl_step import score_rows, update
from tests.trainer.packed_update_worker import make_batch
from tests.trainer.policy_fixtures import build_sgd_policy, tiny_policy_weights

LR = 100.0
PACK_TOKENS = 40  # samples of 10-35 tokens: several packs, some of several samples
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def setup(single_rank_runtime):
    hf, family, _, full = tiny_policy_weights(seed=3, aux_loss=False)
    batch, images, patches = make_batch()  # responses of 7, 3, 9, 0 (empty row), 5, 8, 2, 6 tokens
    model = _build(family, hf, full)[0]
    logp = score_rows(model, batch, images, patches, TEMPERATURE, micro_batch_size=1, pack_tokens=PACK_TOKENS)
    g = torch.Generator().manual_seed(8)
    mask = batch.loss_mask
    old = (logp + 0.3 * torch.randn(mask.shape, generator=g)) * mask  # ratios around 1: some clip
    adv = torch.randn(mask.shape[0], 1, generator=g) * mask
    return dict(hf=hf, family=family, full=full, batch=batch, images=images, patches=patches, logp=logp,
                old=old, adv=adv)


def _build(family, hf, full):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # process-wide: see test_optimizer_reset.py
    return build_sgd_policy(family, hf, full, ParallelConfig(), LR)


def _update(s, loss: LossConfig, adv=None, correction=None, engine=None, max_response_len=None):
    """(metrics, gradient per parameter) of one update from the fixture's weights."""
    model, ddp, optimizer, scheduler = _build(s["family"], s["hf"], s["full"])
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    cfg = UpdateConfig(temperature=TEMPERATURE, loss=loss, pack_tokens=PACK_TOKENS, rollout_correction=correction)
    metrics = update([ddp], optimizer, scheduler, s["batch"], s["images"], s["patches"], s["old"],
                     s["adv"] if adv is None else adv, cfg, engine_logprobs=engine,
                     max_response_len=max_response_len)
    grads = {k: (before[k] - p.detach()) / LR for k, p in model.named_parameters()}
    return metrics, grads


def _closed_form(s, aggregation, max_response_len):
    """The dapo loss (eps 0.2 / 0.28) of the whole batch, aggregated by hand."""
    mask, adv = s["batch"].loss_mask, s["adv"]
    ratio = (s["logp"] - s["old"]).exp()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)) * mask  # [B, S]
    tokens = mask.sum(1)
    nonempty = tokens > 0
    if aggregation == "token-mean":
        return float(pg.sum() / mask.sum())
    if aggregation == "seq-mean-token-sum":
        return float(pg.sum(1)[nonempty].sum() / nonempty.sum())
    if aggregation == "seq-mean-token-mean":
        return float((pg.sum(1)[nonempty] / tokens[nonempty]).sum() / nonempty.sum())
    return float(pg.sum() / (mask.shape[0] * max_response_len))  # Dr. GRPO: every sequence, the empty one too


@pytest.mark.parametrize("aggregation,max_response_len", [
    ("token-mean", None), ("seq-mean-token-sum", None), ("seq-mean-token-mean", None),
    ("seq-mean-token-sum-norm", 12), ("seq-mean-token-sum-norm", None)])
def test_trainer_loss_equals_the_closed_form_aggregation(setup, aggregation, max_response_len):
    metrics, _ = _update(setup, LossConfig(name="dapo", aggregation=aggregation), max_response_len=max_response_len)
    expected_len = max_response_len or int(setup["batch"].loss_mask.sum(1).max())  # the batch's longest: 9
    expected = _closed_form(setup, aggregation, expected_len)
    assert abs(expected) > 1e-3
    # fp32 log-probs of the update's forward vs score_rows' (same packs): ~1e-7
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (aggregation, metrics["loss"], expected)


def _max_rel_err(actual: dict, expected: dict) -> float:
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 1e-4  # a gradient that vanished would pass trivially
    return max(float((actual[k] - expected[k]).abs().max()) for k in expected) / scale


@pytest.mark.parametrize("loss", ["dapo", "cispo"])
def test_truncated_is_weight_scales_the_trainer_gradient_by_c(setup, loss):
    """token_tis, every ratio pi_old / pi_engine = e^5 > C: w = C on every token, so the loss and
    every gradient are C times the uncorrected update's."""
    C = 0.25
    engine = (setup["old"] - 5.0) * setup["batch"].loss_mask
    plain, g_plain = _update(setup, LossConfig(name=loss))
    corrected, g_corr = _update(setup, LossConfig(name=loss), correction=RolloutCorrectionConfig(clip=C),
                                engine=engine)
    assert corrected["loss"] == pytest.approx(C * plain["loss"], rel=1e-5)
    assert _max_rel_err(g_corr, {k: C * g for k, g in g_plain.items()}) < 1e-5
    assert corrected["rollout_truncated_share"] == 1.0 and corrected["rollout_masked_share"] == 0.0
    assert corrected["rollout_mismatch_k1"] == pytest.approx(5.0, rel=1e-5)
    assert corrected["rollout_mismatch_k3"] == pytest.approx(math.exp(5) - 6, rel=1e-5)
    assert corrected["rollout_ratio_p50"] == pytest.approx(math.exp(5), rel=1e-4)


def test_icepop_masked_tokens_lose_their_gradient_and_keep_their_normaliser(setup):
    """Rows 0 and 5 drawn by an engine far from the trainer (ratio e^5 > high): masked. The others
    match (ratio 1, weight 1). The update equals one with those rows' advantages zeroed, whose
    token-mean normaliser still counts their tokens."""
    mask = setup["batch"].loss_mask
    off = torch.zeros(mask.shape[0], 1)
    off[[0, 5]] = 5.0
    engine = (setup["old"] - off) * mask
    masked, g_masked = _update(setup, LossConfig(name="dapo"), correction=RolloutCorrectionConfig(name="icepop"),
                               engine=engine)
    zeroed_adv = setup["adv"].clone()
    zeroed_adv[[0, 5]] = 0.0
    reference, g_ref = _update(setup, LossConfig(name="dapo"), adv=zeroed_adv)
    assert masked["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    assert _max_rel_err(g_masked, g_ref) < 1e-5
    assert masked["rollout_masked_share"] == pytest.approx(float(mask[[0, 5]].sum() / mask.sum()), rel=1e-6)


def test_correction_without_engine_logprobs_is_an_error(setup):
    with pytest.raises(ValueError, match="rollout_correction"):
        _update(setup, LossConfig(name="dapo"), correction=RolloutCorrectionConfig())
