"""Reward models on a tiny random Qwen3 sequence classifier with a char-level tokenizer built here
(nothing is downloaded): batched equals unbatched, the think block is stripped, POLAR inputs."""
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForSequenceClassification

from megatron_vlm.rewards.reward_model import (RelativeRewardModel, RewardModelConfig,
                                               SequenceRewardModel, pair_text)

SPECIALS = ["<pad>", "<unk>", "<|reward|>", "<think>", "</think>"]
PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi", "Write a haiku about the sea, please.", "x"]
RESPONSES = ["4", "<think>red or blue? blue.</think>Blue", "hi!", "Waves fold on the shore\nsalt wind", "<think>y</think>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for code in list(range(32, 127)) + [10]:
        vocab.setdefault(chr(code), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one char each
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[2:])


@pytest.fixture(scope="module")
def parts():
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForSequenceClassification(config).eval(), tokenizer


def test_tokenizer_is_char_level_with_single_token_specials(parts):
    _, tokenizer = parts
    ids = tokenizer("a<think>b\nc")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "<think>", "b", "\n", "c"]


def test_batched_equals_unbatched(parts):
    model, tokenizer = parts
    batched = SequenceRewardModel(model, tokenizer, RewardModelConfig(batch_size=3)).score(PROMPTS, RESPONSES)
    one_by_one = SequenceRewardModel(model, tokenizer, RewardModelConfig(batch_size=1)).score(PROMPTS, RESPONSES)
    # fp32, 2 layers: padding only changes the summation order of masked-out terms
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == len(PROMPTS)  # the scores do depend on the input


def test_think_block_is_stripped_before_scoring(parts):
    model, tokenizer = parts
    rm = SequenceRewardModel(model, tokenizer, RewardModelConfig())
    stripped = rm.score(["Name a colour."] * 2, ["<think>red or blue? blue.</think>Blue", "Blue"])
    assert stripped[0] == pytest.approx(stripped[1], abs=1e-6)
    assert rm.texts(["p"], ["<think>secret</think>answer"]) == ["p\nanswer"]
    raw = SequenceRewardModel(model, tokenizer, RewardModelConfig(strip_think=False))
    assert raw.score(["Name a colour."], ["<think>red or blue? blue.</think>Blue"])[0] != pytest.approx(stripped[1], abs=1e-4)
    # an answer only inside an unclosed think block leaves nothing to score but the prompt
    assert rm.texts(["p"], ["<think>Blue"]) == ["p\n"]


def test_long_inputs_keep_their_end(parts):
    model, tokenizer = parts
    rm = SequenceRewardModel(model, tokenizer, RewardModelConfig(max_length=8))
    long_prefix = rm.score(["q" * 200], ["final answer"])[0]
    other_prefix = rm.score(["z" * 200], ["final answer"])[0]
    assert long_prefix == pytest.approx(other_prefix, abs=1e-6)  # both cut to the last 8 chars, "l answer"


def test_relative_reward_model_polar_input(parts):
    model, tokenizer = parts
    references = ["4", "Blue", "hello", "Sea", "y"]
    rm = RelativeRewardModel(model, tokenizer, RewardModelConfig(batch_size=2))
    assert rm.texts(["Q"], ["<think>t</think>A"], ["<think>u</think>R"]) == ["QR<|reward|>QA"]
    batched = rm.score(PROMPTS, RESPONSES, references)
    one_by_one = RelativeRewardModel(model, tokenizer, RewardModelConfig(batch_size=1)).score(PROMPTS, RESPONSES, references)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    with pytest.raises(ValueError, match="needs a reference response"):
        rm.score(["Q"], ["A"])


def test_from_pretrained_and_chat_template(parts, tmp_path):
    model, tokenizer = parts
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = SequenceRewardModel.from_pretrained(str(tmp_path), RewardModelConfig(batch_size=2))
    direct = SequenceRewardModel(model, tokenizer, RewardModelConfig(batch_size=2))
    assert loaded.score(PROMPTS, RESPONSES) == pytest.approx(direct.score(PROMPTS, RESPONSES), abs=1e-6)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    try:
        assert pair_text(tokenizer, "p", "r") == "[user]p[assistant]r"
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize("kwargs, message", [(dict(batch_size=0), "reward_model.batch_size must be >= 1, got 0"),
                                             (dict(max_length=1), "reward_model.max_length must be >= 2, got 1")])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardModelConfig(**kwargs)


def test_run_config_section_loads_the_reward_model_for_the_scorer(parts, tmp_path):
    from megatron_vlm.config import load_config
    from megatron_vlm.rewards.reward_model import RelativeRewardModel, load_reward_model
    from megatron_vlm.rewards.scorer import RewardSample, RewardScorer

    model, tokenizer = parts
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = load_config(None, [f"reward_model.path={tmp_path / 'rm'}", "reward_model.batch_size=2",
                             "reward.verifiers={chat: reward_model, sums: numeric}", "reward.num_workers=1"])
    rm = load_reward_model(cfg.reward_model)
    samples = [RewardSample(sample_id=i, task="chat", prompt=p, response=r)
               for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    samples.append(RewardSample(sample_id=9, task="sums", prompt="1+1", response="2", reference="2"))
    with RewardScorer(cfg.reward, rm) as scorer:
        result = scorer.score(samples)
    assert result.raw[:-1] == pytest.approx(rm.score(PROMPTS, RESPONSES), abs=1e-6)
    assert result.raw[-1] == 1.0 and not result.failures
    relative = load_reward_model(load_config(None, [f"reward_model.path={tmp_path / 'rm'}",
                                                    "reward_model.relative=true"]).reward_model)
    assert isinstance(relative, RelativeRewardModel)
    with pytest.raises(FileNotFoundError, match="reward_model.path: no config.json in"):
        load_reward_model(load_config(None, [f"reward_model.path={tmp_path}"]).reward_model)
