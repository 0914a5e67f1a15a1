"""One full RL step of a tiny VLM on two gloo ranks (rl_step_worker.py): weight sync + check,
rollouts, GRPO, trainer old log-probs, DAPO update; the loss normalisation is exact, so one
micro-batch on one DP rank and one-row micro-batches over two DP ranks reach the same parameters
(also for CISPO with Dr. GRPO's aggregation and truncated-IS rollout correction), and so does the
update that takes pi_old from its own forward (on-policy), whose log-probs reach the caller before
the optimizer step."""
import json
import os

import pytest

from megatron_vlm.parallel.launch import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "rl_step_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.dist
def test_one_rl_step_on_two_ranks(tmp_path):
    out = tmp_path / "rl.json"
    result = launch_local([WORKER, str(out)], nproc=2, timeout=400, env={"PYTHONPATH": ROOT})
    assert result.ok, result.summary()
    r = json.loads(out.read_text())
    print(json.dumps(r))
    assert r["samples"] == 12 and r["mixed_groups"] >= 1
    assert r["sync_max_abs"] < 1e-5                     # engine == trainer after the sync
    assert abs(r["loss_one"] - r["loss_many"]) < 1e-6   # same loss, however it was split
    assert abs(r["grad_norm_one"] - r["grad_norm_many"]) < 1e-5 * max(1.0, r["grad_norm_one"])
    assert r["param_max_update"] > 1e-4                 # the step moved the weights...
    assert r["param_max_abs_diff"] < 1e-6               # ...identically in both layouts
    # entropy of the sampling distribution, the same however the tokens were split (TP2 vs EP2)
    assert 0 < r["entropy_one"] < 5.3 and abs(r["entropy_one"] - r["entropy_many"]) < 1e-5  # ln(200)=5.3
    # CISPO + seq-mean-token-sum-norm + token TIS: the same step however the rows were split
    assert 0 < r["corrected_truncated_one"] < 1
    assert abs(r["corrected_truncated_one"] - r["corrected_truncated_many"]) < 1e-6
    assert abs(r["corrected_loss_one"] - r["corrected_loss_many"]) < 1e-6
    assert abs(r["corrected_grad_norm_one"] - r["corrected_grad_norm_many"]) < 1e-5 * max(
        1.0, r["corrected_grad_norm_one"])
    assert r["corrected_param_max_update"] > 1e-4 and r["corrected_param_max_abs_diff"] < 1e-6
    # on-policy: pi_old from the update's forward is the step the scored old log-probs gave
    assert r["on_policy_calls"] == 1                       # once, before the optimizer step
    assert r["on_policy_logprobs_max_abs"] < 1e-5          # score_rows' log-probs (other packs: fp32 bits)
    assert r["on_policy_logprobs_across_ranks"] == 0.0     # gathered: the same on every rank
    assert r["on_policy_off_response"] == 0.0              # 0 past each row's tokens, as score_rows
    assert r["on_policy_ratio"] == [1.0, 1.0] and r["on_policy_approx_kl"] == 0.0
    assert abs(r["scored_approx_kl"]) < 1e-6
    assert abs(r["on_policy_loss"] - r["loss_many"]) < 1e-6
    assert r["on_policy_param_max_abs_diff"] < 1e-6
    assert r["refused_raised"] and r["refused_param_max_update"] == 0.0
