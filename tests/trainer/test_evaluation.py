"""Per-kind held-out accuracy (trainer/evaluation.py) against a hand-counted scored set, the strict
figure from the rewards' own well-formed check, and the GRPO stage's per-kind reward."""
import math

import pytest

from megatron_vlm.rewards.extract import format_problem
from megatron_vlm.trainer.evaluation import accuracy_metrics, mean_by, sample_kind
from megatron_vlm.trainer.stages.grpo import reward_by_kind

GOOD = "<think>\nLeft 3, right 7. max(3,7)=7\n</think>\n\n7"
JUNK = "<think>\n7\n</think>\n\n7"    # the number is right, the reasoning is junk
UNCLOSED = "<think>\nLeft 3, right 7. max(3,7)=7\n\n7"

# kind, larger, correct, response
SCORED = [("sum", "left", True, GOOD), ("sum", "right", False, GOOD),
          ("max", "left", True, JUNK), ("max", "left", True, GOOD), ("max", "right", False, GOOD),
          ("difference", "equal", True, GOOD)]


def test_per_kind_strict_and_sliced_accuracy_match_a_hand_count():
    kinds, larger, correct, responses = zip(*SCORED)
    well_formed = [format_problem(r) is None for r in responses]
    assert well_formed == [True, True, False, True, True, True] and format_problem(UNCLOSED) is not None
    m = accuracy_metrics(kinds, correct, well_formed, {"larger": larger})
    assert m["eval_accuracy"] == pytest.approx(4 / 6) and m["eval_samples"] == 6
    assert m["eval_strict_accuracy"] == pytest.approx(3 / 6)   # the junk-think max answer is not counted
    assert m["eval_well_formed"] == pytest.approx(5 / 6)
    assert (m["eval/accuracy/sum"], m["eval/strict_accuracy/sum"], m["eval/samples/sum"]) == (0.5, 0.5, 2)
    assert m["eval/accuracy/max"] == pytest.approx(2 / 3) and m["eval/strict_accuracy/max"] == pytest.approx(1 / 3)
    assert (m["eval/accuracy/difference"], m["eval/strict_accuracy/difference"]) == (1.0, 1.0)
    # max read from one side: right when the left digit is larger, wrong when the right one is
    assert (m["eval/accuracy/max/larger=left"], m["eval/samples/max/larger=left"]) == (1.0, 2)
    assert (m["eval/accuracy/max/larger=right"], m["eval/samples/max/larger=right"]) == (0.0, 1)
    assert m["eval/accuracy/difference/larger=equal"] == 1.0
    assert len([k for k in m if k.startswith("eval/accuracy/")]) == 3 + 5  # 3 kinds, 5 (kind, larger) pairs


def test_one_kind_without_a_kind_column_has_only_the_overall_figures():
    m = accuracy_metrics(["digits"] * 4, [True, False, False, True], [True] * 4)
    assert m == {"eval_accuracy": 0.5, "eval_strict_accuracy": 0.5, "eval_well_formed": 1.0, "eval_samples": 4}
    assert "eval/accuracy/digits" in accuracy_metrics(["digits"] * 4, [True] * 4, [True] * 4, per_kind=True)
    assert math.isnan(accuracy_metrics([], [], [])["eval_accuracy"])
    with pytest.raises(ValueError, match="3 kinds, 2 verdicts"):
        accuracy_metrics(["a", "b", "c"], [True, False], [True, True])


def test_a_sample_kind_is_its_kind_column_else_its_task():
    assert sample_kind({"kind": "max", "task": "digits"}) == "max"
    assert sample_kind({"task": "arith"}) == "arith" and sample_kind({"family": "x", "task": "t"}, "family") == "x"
    assert mean_by(["a", "b", "a"], [1.0, 0.0, 0.0]) == {"a": 0.5, "b": 0.0}


def test_the_grpo_stage_reports_the_mean_reward_of_each_kind():
    class Request:
        def __init__(self, **metadata):
            self.metadata = metadata

    scored = [(Request(kind="sum", task="digits"), 1.0), (Request(kind="max", task="digits"), 0.0),
              (Request(kind="max", task="digits"), 1.0), (Request(kind="max", task="digits"), 1.0)]
    assert reward_by_kind(scored, "kind") == {"reward/by_kind/sum": 1.0, "reward/by_kind/max": pytest.approx(2 / 3)}
    one_task = [(Request(task="digits"), 1.0), (Request(task="digits"), 0.0)]
    assert reward_by_kind(one_task, "kind") == {}
    two_tasks = [(Request(task="digits"), 1.0), (Request(task="arith"), 0.0)]
    assert reward_by_kind(two_tasks, "kind") == {"reward/by_kind/digits": 1.0, "reward/by_kind/arith": 0.0}
    formed = reward_by_kind(scored, "kind", [True, False, True, False])  # the share of each kind's well-formed ones
    assert formed["reward/by_kind/sum/well_formed"] == 1.0 and formed["reward/by_kind/max/well_formed"] == pytest.approx(1 / 3)
    assert formed["reward/by_kind/max"] == pytest.approx(2 / 3)
