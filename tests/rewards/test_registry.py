"""The registry contract: names, duplicates, unknown names, dotted-path user rewards."""
import pytest

from megatron_vlm.rewards import registry
from megatron_vlm.rewards.registry import (check_reward_contract, register_verifier, registered_verifiers,
                                           resolve_reward_fn)

from . import user_rewards

USER = user_rewards.__name__  # 'tests.rewards.user_rewards' or 'rewards.user_rewards', as pytest imported it

BUILTINS = ["boolean", "choice", "formula", "instructions", "math", "numeric", "sequence",
            "short_answer", "subquestions"]


def test_builtins_registered():
    assert registered_verifiers() == BUILTINS


def test_duplicate_name_rejected():
    with pytest.raises(ValueError, match="'math' is already registered"):
        register_verifier("math")(lambda response, reference, metadata: 0.0)


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as info:
        resolve_reward_fn("maths")
    assert "unknown verifier 'maths'" in str(info.value)
    for name in BUILTINS:
        assert name in str(info.value)


def test_register_and_resolve_new_name():
    name = "test_registry_always_one"
    try:
        register_verifier(name)(lambda response, reference, metadata: 1.0)
        assert resolve_reward_fn(name)("x", None, {}) == 1.0
    finally:
        registry._VERIFIERS.pop(name)


def test_dotted_path_resolves_user_function():
    fn = resolve_reward_fn(f"{USER}:exact_match")
    assert fn is user_rewards.exact_match
    assert fn("42", 42, {}) == 1.0


@pytest.mark.parametrize("spec, error, message", [
    ("no_such_pkg.module:fn", ValueError, "cannot import module 'no_such_pkg.module'"),
    (f"{USER}:missing", ValueError, "has no attribute 'missing'"),
    (f"{USER}:wrong_signature", TypeError, "must accept \\(response, reference, metadata\\)"),
    (":fn", ValueError, "must look like 'my_pkg.module:function'"),
])
def test_dotted_path_errors_say_what_is_wrong(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_reward_fn(spec)


def test_contract_passes_for_builtins_and_a_user_reward():
    assert check_reward_contract("math") == [1.0, 1.0, 0.0]
    assert check_reward_contract(f"{USER}:exact_match", [("4", 4, {}), ("5", 4, {})]) == [1.0, 0.0]


@pytest.mark.parametrize("fn, error, message", [
    ("returns_text", TypeError, "returned str '1.0'"),
    ("returns_nan", ValueError, "must be finite"),
    ("not_deterministic", ValueError, "not deterministic"),
    ("raises", RuntimeError, "user reward failed"),
])
def test_contract_catches_broken_user_rewards(fn, error, message):
    with pytest.raises(error, match=message):
        check_reward_contract(f"{USER}:{fn}")
