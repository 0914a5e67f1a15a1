"""The GRPO stage's recipe options on two gloo ranks (grpo_stage_worker.py): reference policy and
KL, dynamic sampling, the soft over-long penalty and truncation masking, replica dealing."""
import os

import pytest

from tests.utils import run_worker

WORKER = os.path.join(os.path.dirname(__file__), "grpo_stage_worker.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_worker(WORKER, tmp_path_factory.mktemp("grpo"))


@pytest.mark.dist
def test_one_replica_over_tp_ranks_gives_each_sample_once(report):
    assert report["samples"] == 12          # 3 prompts x 4, not doubled by the two TP ranks
    assert report["sync_max_abs"] < 1e-5


@pytest.mark.dist
def test_reference_equals_policy_at_reset_then_kl_grows(report):
    assert abs(report["kl_first"]) < 1e-7   # pi_ref reset from pi: k3 is exactly 0
    assert report["kl_second"] > 1e-6       # one optimizer step later it is not
    assert report["time_ref"] > 0


@pytest.mark.dist
def test_dynamic_sampling_draws_until_the_batch_is_informative(report):
    # 2 informative groups per draw (r2 always ties): 2 draws for 3 groups, 2 groups dropped
    assert report["dyn_draws"] == 2 and report["dyn_kept"] == 3 and report["dyn_dropped"] == 2
    assert report["dyn_samples"] == 24 and report["dyn_train_tokens"] > 0


@pytest.mark.dist
def test_overlong_penalty_and_truncation_mask(report):
    # limit 3, buffer 2: penalty 0 at length 1, -0.5 at 2, -1 at 3 (verifier reward 0 here)
    length = report["ol_response_length"]
    assert -1.0 <= report["ol_reward"] <= 0 and (length <= 1 or report["ol_reward"] < 0)
    assert report["ol_raw"] == 0.0  # the curve shows the verifier's score, not the shaping
    assert report["ol_masked"] == round(report["ol_truncated_share"] * report["ol_samples"])
    assert report["ol_masked"] > 0


@pytest.mark.dist
def test_empty_responses_get_zero_reward_and_stay_in_the_batch(report):
    assert report["empty_samples"] == 12 and report["empty_seen"] == 3  # one per group, all kept
    # 'varied' scores len(response) + ..., so only the empty ones score 0: the step still trains
    assert report["empty_train_tokens"] == round(report["empty_response_length"] * 12)
    assert report["empty_train_tokens"] > 0 and report["empty_sync"] < 1e-5
    # rollout correction wired through the stage: engine and trainer agree after the sync
    assert abs(report["rollout_mismatch_k1"]) < 1e-5 and report["rollout_masked_share"] == 0
    assert abs(report["rollout_ratio_p50"] - 1) < 1e-5 and abs(report["rollout_is_weight_mean"] - 1) < 1e-5
    assert "rollout.old_logprobs = trainer" in report["rc_engine_refused"]
