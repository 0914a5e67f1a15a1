"""Rewards: verifiers, reward models, per-task normalisation, and the scoring service.

    registry.py       register_verifier / resolve_reward_fn: names and `pkg.module:function` paths
    extract.py        final answer after </think>, boxed answers, the template check, normalisation
    lexicon.py        every natural-language word list (anchors, yes/no, hedges...), five languages
    verifiers/        math (math-verify), choice, numeric, formula, boolean, sequence, short_answer,
                      subquestions, instructions
    pool.py           worker processes with a hard, process-level timeout per sample
    scorer.py         RewardConfig, RewardSample, RewardScorer (the trainer's entry point)
    normalization.py  per-task none / mean_std / rank, then per-task weights
    reward_model.py   sequence-classification RM and POLAR-style relative RM (imports torch)
    hacking.py        flags RM scores diverging from verifier scores
    judge.py          the `judge` kind: a local causal LM grading answers (imports torch)
    bench/            hang_absorption: hangs per batch a worker pool absorbs

This package does not import megatron-core or the trainer; `reward_model` is the only module that
imports torch (with `judge`), so reward workers start without it.
"""
from megatron_vlm.rewards.registry import (get_verifier, register_verifier, registered_verifiers,
                                           resolve_reward_fn)
from megatron_vlm.rewards.scorer import (RewardConfig, RewardFailure, RewardResult, RewardSample,
                                         RewardScorer)

__all__ = ["RewardConfig", "RewardFailure", "RewardResult", "RewardSample", "RewardScorer",
           "get_verifier", "register_verifier", "registered_verifiers", "resolve_reward_fn"]
