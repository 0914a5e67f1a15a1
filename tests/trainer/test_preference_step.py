"""The offline preference step (DPO / MPO) of a tiny VLM on two gloo ranks (preference_worker.py):
exact normalisation (one micro-batch on one DP rank == one-pair micro-batches over two DP ranks),
and a few DPO steps separate chosen from rejected."""
import os

import pytest

from tests.utils import run_worker

WORKER = os.path.join(os.path.dirname(__file__), "preference_worker.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_worker(WORKER, tmp_path_factory.mktemp("preference"))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["dpo", "mpo"])
def test_loss_and_update_do_not_depend_on_the_split(report, name):
    r = report[name]
    assert report["rows"] == 10 and len(set(report["response_lengths"])) > 2  # uneven pairs
    assert r["microbatches_many"] >= 2
    assert abs(r["loss_one"] - r["loss_many"]) < 1e-6
    assert abs(r["grad_norm_one"] - r["grad_norm_many"]) < 1e-5 * max(1.0, r["grad_norm_one"])
    assert r["metric_max_abs_diff"] < 1e-5          # accuracy, margins, log-ratios, loss terms
    assert r["param_max_update"] > 1e-4             # the step moved the weights...
    assert r["param_max_abs_diff"] < 1e-6           # ...identically in both layouts
    # CP=2: sequence log-probs summed over the ranks' chunks of each response
    assert abs(r["loss_one"] - r["loss_cp"]) < 1e-6 and r["metric_max_abs_diff_cp"] < 1e-5
    assert abs(r["grad_norm_one"] - r["grad_norm_cp"]) < 1e-5 * max(1.0, r["grad_norm_one"])
    assert r["param_max_abs_diff_cp"] < 1e-6
    assert {"loss", "reward_accuracy", "reward_margin", "logratio_chosen", "logratio_rejected",
            "grad_norm", "lr"} <= set(r["metrics"])
    if name == "mpo":
        assert {"bco_loss", "sft_loss", "dpo_loss"} <= set(r["metrics"]) and r["bco_reward_count"] == 10
        assert abs(r["bco_reward_sum_one"] - r["bco_reward_sum_many"]) < 1e-5


@pytest.mark.dist
def test_a_rank_without_pairs_changes_nothing(report):
    r = report["single_pair"]
    assert abs(r["loss_one"] - r["loss_many"]) < 1e-6 and r["param_max_update"] > 1e-4
    assert r["param_max_abs_diff"] < 1e-6


@pytest.mark.dist
def test_dpo_steps_separate_chosen_from_rejected(report):
    t = report["training"]
    assert abs(t["margin_before"]) < 1e-6 and t["accuracy_before"] == 0.0  # policy == reference
    assert t["margin_after"] > 0.1 and t["accuracy_after"] == 1.0
    assert t["loss_per_step"][-1] < t["loss_per_step"][0]


def test_demo_pairs_become_an_alternating_batch(tmp_path):
    from megatron_vlm.data.loading import load_preferences
    from megatron_vlm.data.processor import MultimodalProcessor
    from megatron_vlm.trainer.preference import pair_batch
    from megatron_vlm.trainer.context import PromptCache
    from tests.data.digits_fixtures import demo_assets

    processor = MultimodalProcessor.from_pretrained(demo_assets()["model"])
    pairs = load_preferences(demo_assets()["pref"], processor, cache_dir=str(tmp_path)).requests[:3]
    built = pair_batch(pairs, PromptCache(processor), pad_id=0, spatial_merge_size=2)
    assert built.num_pairs == 3 and built.images_per_row == [1] * 6 and len(built.patches) == 6
    responses = [ids for _, chosen, rejected in pairs for ids in (chosen, rejected)]
    assert built.batch.loss_mask.sum(-1).int().tolist() == [len(ids) for ids in responses]
    for row, ids in enumerate(responses):  # labels under the mask are the response, in order
        assert built.batch.labels[row][built.batch.loss_mask[row].bool()].tolist() == ids
