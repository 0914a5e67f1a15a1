"""`plan` and `check` describe the model a VLM run builds: its HF config, not the `model:` section.

The digits demo is planned both before its assets exist (the config build_demo_assets would write,
nothing written) and from written assets; either way the counts equal the parameters of the HF
model built from that config. The GPU recipes plan from the in-repo copy of Qwen3-VL-30B-A3B's
config.json, which is checked against transformers' own Qwen3-VL-MoE defaults.
"""
import json
import shutil

import pytest

from megatron_vlm.cli import main
from megatron_vlm.config import load_config
from megatron_vlm.data.digits import demo_hf_config
from megatron_vlm.models import family_for
from megatron_vlm.parallel.plan import format_plan, total_params
from tests.data.digits_fixtures import demo_assets

DEMO = "configs/digits_demo.yaml"
QWEN3_VL_30B = "configs/hf/qwen3_vl_30b_a3b"


def hf_parameter_count(hf_config) -> int:
    return sum(p.numel() for p in family_for(hf_config).hf_model_class(hf_config).parameters())


def planned_count(cfg) -> int:
    planned = cfg.planned_model()
    return total_params(planned.lm)[0] + planned.vision_params


def test_digits_demo_before_its_assets_exist(tmp_path):
    assets = tmp_path / "assets"
    cfg = load_config(DEMO, [f"vlm.assets={assets}"])
    expected = hf_parameter_count(demo_hf_config())
    assert planned_count(cfg) == expected
    plan = format_plan(cfg, 2)
    assert "model: 4 layers, hidden 128, 4 experts (top-2), " in plan
    assert f"{expected / 1e6:.2f}M parameters" in plan and "digits demo" in plan
    assert not assets.exists()  # plan writes nothing


def test_digits_demo_from_written_assets():
    model_dir = demo_assets()["model"]
    cfg = load_config(DEMO, [f"vlm.assets={model_dir.parent}"])
    planned = cfg.planned_model()
    assert planned.source == str(model_dir / "config.json")
    assert planned.lm == family_for(demo_hf_config()).language_config(demo_hf_config())
    from transformers import AutoConfig

    assert planned_count(cfg) == hf_parameter_count(AutoConfig.from_pretrained(str(model_dir)))


def test_ep_that_does_not_divide_the_hf_experts_is_refused(tmp_path, capsys):
    args = ["plan", "--config", DEMO, f"vlm.assets={tmp_path / 'assets'}", "parallel.ep=3",
            "runtime.nproc=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "parallel.ep (3) does not divide text_config.num_experts (4)" in err
    with pytest.raises(ValueError, match=r"text_config.num_hidden_layers \(4\) is not divisible"):
        load_config(DEMO, [f"vlm.assets={tmp_path / 'a'}", "parallel.pp=3"]).check(3)


def test_gpu_recipe_plans_from_the_in_repo_hf_config():
    plan = format_plan(load_config("configs/qwen3_vl_30b_a3b_grpo.yaml"), 32)
    assert "48 layers, hidden 2048, 128 experts (top-8), 31.07B parameters, 3.89B active" in plan
    assert f"from {QWEN3_VL_30B}/config.json" in plan


def test_in_repo_config_is_qwen3_vl_30b_a3b():
    """Its vision tower is transformers' default Qwen3-VL-MoE tower (out_hidden_size: the text
    width); its text model has the released 30B-A3B shapes."""
    from transformers import AutoConfig, Qwen3VLMoeConfig

    config = AutoConfig.from_pretrained(QWEN3_VL_30B)
    default = Qwen3VLMoeConfig().vision_config.to_dict()
    ours = config.vision_config.to_dict()
    assert {k for k in default if default[k] != ours.get(k)} == {"out_hidden_size"}
    assert ours["out_hidden_size"] == config.text_config.hidden_size
    t = config.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_experts, t.num_experts_per_tok,
            t.moe_intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.vocab_size) == (2048, 48, 128, 8, 768, 32, 4, 128, 151936)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20]


def test_model_config_that_disagrees_with_the_assets_is_refused(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    config = json.loads((demo_assets()["model"] / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    cfg = load_config(DEMO, [f"vlm.assets={demo_assets()['model'].parent}", f"vlm.model_config={copy}"])
    with pytest.raises(ValueError, match="vlm.model_config .* describes another model"):
        cfg.check(2)
    shutil.copy(demo_assets()["model"] / "config.json", copy / "config.json")
    cfg.check(2)  # the same config: accepted


def test_missing_hf_config_and_stray_model_section_are_named(tmp_path):
    cfg = load_config(DEMO, [f"vlm.assets={tmp_path}", "vlm.build_demo_assets=false"])
    with pytest.raises(FileNotFoundError, match="set vlm.model_config"):
        cfg.check(2)
    cfg = load_config(DEMO, [f"vlm.assets={tmp_path}", "model.num_layers=6"])
    with pytest.raises(ValueError, match="a model: section is read by the LM trainer only"):
        cfg.check(2)
