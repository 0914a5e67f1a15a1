"""A run starts from real weights (`vlm.init_from`): an HF directory, each rank reading only its
slice, or `convert hf-to-mcore` output, each rank its own files; told apart by their files, with
errors that name the setting, the directory or the missing file."""
import os
import shutil

import pytest
import torch

from megatron_vlm.checkpoint import convert
from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig
from tests.checkpoint.test_convert import write_hub_checkpoint
from tests.models.vlm_fixtures import make_hf_model
from tests.utils import run_worker

WORKER = os.path.join(os.path.dirname(__file__), "init_from_worker.py")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A tiny Qwen3-VL-MoE as the Hub stores it (fused experts transposed, several shards)."""
    hf = make_hf_model("qwen3_vl_moe", seed=6)
    return hf, write_hub_checkpoint(hf, tmp_path_factory.mktemp("init") / "hub")


def build(hf_config, parallel=ParallelConfig()):
    return family_for(hf_config).build(hf_config, parallel, "cpu", calculate_per_token_loss=True)


def test_kind_is_told_from_the_files_and_neither_kind_is_named(hub, tmp_path):
    _, hub_dir = hub
    assert convert.checkpoint_kind(hub_dir) == "hf"
    convert.hf_to_mcore(str(hub_dir), str(tmp_path / "mc"), ParallelConfig())
    assert convert.checkpoint_kind(tmp_path / "mc") == "mcore"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"vlm.init_from: {tmp_path / 'empty'} is neither a "
                                                f"Hugging Face checkpoint .* nor a megatron_vlm"):
        convert.checkpoint_kind(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=f"vlm.init_from: {tmp_path / 'gone'} does not exist"):
        convert.checkpoint_kind(tmp_path / "gone")


def test_hf_load_equals_the_full_load_at_tp1(hub, single_rank_runtime):
    hf, hub_dir = hub
    family = family_for(hf.config)
    reference = build(hf.config)
    load_full_state_dict(reference, dict(hf_to_mcore(family.hf_rules(hf.config), hf.state_dict().__getitem__)),
                         RankLayout.current(reference.config))
    model = build(hf.config)
    assert "read" in convert.load_weights(model, str(hub_dir), family, hf.config)
    theirs = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_bf16_params_load_from_fp32_files(hub, single_rank_runtime):
    hf, hub_dir = hub
    model = family_for(hf.config).build(hf.config, ParallelConfig(), "cpu", torch.bfloat16,
                                        calculate_per_token_loss=True)
    convert.load_weights(model, str(hub_dir), family_for(hf.config), hf.config)
    embed = hf.state_dict()["model.language_model.embed_tokens.weight"]
    assert torch.equal(model.language.embedding.word_embeddings.weight, embed.to(torch.bfloat16))


def test_missing_hf_shard_is_named(hub, tmp_path, single_rank_runtime):
    hf, hub_dir = hub
    broken = shutil.copytree(hub_dir, tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed in .* is missing"):
        convert.load_weights(build(hf.config), str(broken), family_for(hf.config), hf.config)


def test_missing_rank_file_is_named_on_every_rank(hub, tmp_path, single_rank_runtime):
    hf, hub_dir = hub
    convert.hf_to_mcore(str(hub_dir), str(tmp_path / "mc"), ParallelConfig())
    (tmp_path / "mc" / "experts-pp0-ep0-etp0.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="experts-pp0-ep0-etp0.safetensors: rank file missing"):
        convert.load_weights(build(hf.config), str(tmp_path / "mc"), family_for(hf.config), hf.config)


def test_checkpoint_of_another_architecture_is_refused(hub, tmp_path, single_rank_runtime):
    hf, hub_dir = hub
    convert.hf_to_mcore(str(hub_dir), str(tmp_path / "mc"), ParallelConfig())
    dense = make_hf_model("qwen3_vl").config
    with pytest.raises(ValueError, match="vlm.init_from: .* holds a Qwen3VLMoeForConditionalGeneration, "
                                         "the run builds a Qwen3VLForConditionalGeneration"):
        convert.load_weights(build(dense), str(tmp_path / "mc"), family_for(dense), dense)


def test_hf_config_of_a_megatron_checkpoint_is_read_from_its_hf_dir(hub, tmp_path):
    from megatron_vlm.models.source import resolve_hf_config
    from megatron_vlm.config import VLMConfig

    hf, hub_dir = hub
    convert.hf_to_mcore(str(hub_dir), str(tmp_path / "mc"), ParallelConfig())
    config, source = resolve_hf_config(VLMConfig(init_from=str(tmp_path / "mc")))
    assert source == str(tmp_path / "mc" / "hf" / "config.json")
    assert config.text_config.num_experts == hf.config.text_config.num_experts


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """init_from_worker.py on 2 ranks, with an HF dir per family and its conversion per layout."""
    from tests.checkpoint.init_from_worker import LAYOUTS

    root = tmp_path_factory.mktemp("init_ranks")
    for family_name, layouts in LAYOUTS.items():
        hf = make_hf_model(family_name, seed=8, tie=family_name == "qwen3_vl")
        hub_dir = write_hub_checkpoint(hf, root / family_name / "hub")
        for name, settings in layouts.items():
            convert.hf_to_mcore(str(hub_dir), str(root / family_name / name), ParallelConfig(**settings))
    return run_worker(WORKER, root, args=(str(root),))


@pytest.mark.dist
def test_each_rank_reads_only_its_slice_and_gets_the_full_loads_values(sharded):
    from tests.checkpoint.init_from_worker import LAYOUTS

    assert len(sharded) == sum(len(v) for v in LAYOUTS.values())
    for layout, r in sharded.items():
        assert r["hf_max_abs_diff"] == 0 and r["mcore_max_abs_diff"] == 0, (layout, r)
        assert r["ranks_reading_other_than_their_params"] == 0, (layout, r)  # bytes == own params
        assert r["max_rank_bytes"] < r["full_bytes"], (layout, r)
    # At TP=2 (experts over expert TP or EP) two ranks read the model once, plus a second copy of
    # what is not split (norms, routers, the replicated vision tower): each read half of the rest.
    for layout in ("qwen3_vl/tp2", "qwen3_vl_moe/tp2_etp2", "qwen3_vl_moe/tp2_ep2"):
        r = sharded[layout]
        assert r["sum_rank_bytes"] == r["full_bytes"] + r["unsplit_bytes"], (layout, r)
    pp2 = sharded["qwen3_vl_moe/pp2"]  # two stages, untied head: every tensor read once in all
    assert pp2["sum_rank_bytes"] == pp2["full_bytes"]
