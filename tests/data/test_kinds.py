"""Question kinds in the config (`vlm.kinds`): each split keeps only the kinds it names, so no
demonstration of an excluded kind reaches the SFT data (or a preference pair), while the prompts
and held-out rows keep every kind; a kind the file lacks is an error naming the field."""
import json
from pathlib import Path

import pytest

from megatron_vlm.config import load_config
from megatron_vlm.data.digits import QUESTIONS, DigitsConfig, build_splits, larger
from megatron_vlm.data.loading import (DataError, KindsConfig, load_preferences, load_prompts, load_sft_requests,
                                       select_kinds)
from megatron_vlm.trainer.context import ensure_assets, load_data
from tests.data.digits_fixtures import SMALL, demo_assets

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits_demo.yaml"


def demo_config(*overrides):
    assets = demo_assets()["model"].parent
    return load_config(DEMO, [f"vlm.assets={assets}", "vlm.build_demo_assets=false", "rollout.prompts_per_step=4",
                              "eval.samples=30", *overrides]), assets


def test_no_demonstration_of_an_excluded_kind_reaches_the_sft_data(processor):
    cfg, assets = demo_config("vlm.kinds.sft=[sum]")
    data = load_data(cfg, assets, processor, announce=False)
    assert data.sft and {r.metadata["kind"] for r in data.sft} == {"sum"}
    # the prompts and the held-out rows keep every kind: max and difference are verifiable only
    assert {r.metadata["kind"] for r in data.prompts} == set(QUESTIONS)
    assert {r.metadata["kind"] for r in data.evals} == set(QUESTIONS)
    every = load_data(demo_config("vlm.kinds.sft=null")[0], assets, processor, announce=False)
    assert len(data.sft) == sum(r.metadata["kind"] == "sum" for r in every.sft) == SMALL["num_sft"] // 3


def test_the_main_job_demonstrates_sum_and_difference_only():
    cfg = load_config(DEMO, [])
    assert cfg.vlm.kinds == KindsConfig(sft=["sum", "difference"])
    assert set(QUESTIONS) - set(cfg.vlm.kinds.sft) == {"max"}  # the headline kind: no demonstration
    assert {s.kind for s in cfg.stages} == {"sft", "grpo"} and cfg.eval.samples == DigitsConfig().num_eval


def test_filter_counts_what_it_drops(processor):
    path = demo_assets()["sft"]
    loaded = load_sft_requests(path, processor)
    kept = select_kinds(loaded, ["max", "difference"], "kind", source=path, field="vlm.kinds.sft")
    assert {r.metadata["kind"] for r in kept.requests} == {"max", "difference"}
    assert kept.counts["loaded"] + kept.counts["dropped_kind"] == kept.counts["rows"] == SMALL["num_sft"]
    assert select_kinds(loaded, None, "kind", source=path, field="vlm.kinds.sft") is loaded
    prompts = load_prompts(demo_assets()["rl"], processor)
    by_task = select_kinds(prompts, ["digits"], "task", source=path, field="vlm.kinds.rl")  # any column
    assert len(by_task.requests) == len(prompts.requests) == SMALL["num_rl"]


def test_preference_pairs_are_cut_like_demonstrations(processor):
    path = demo_assets()["pref"]
    pairs = select_kinds(load_preferences(path, processor), ["sum"], "kind", source=path, field="vlm.kinds.sft")
    assert pairs.requests and {p.request.metadata["kind"] for p in pairs.requests} == {"sum"}


def test_a_wrong_kind_name_is_an_error_naming_the_field(processor):
    cfg, assets = demo_config("vlm.kinds.sft=[sum, maximum]")
    with pytest.raises(DataError, match=r"vlm\.kinds\.sft: \['maximum'\] not found in .*sft\.parquet "
                                        r"\(its 'kind' values: \['difference', 'max', 'sum'\]\)"):
        load_data(cfg, assets, processor, announce=False)
    cfg, _ = demo_config("vlm.kinds.eval=[sum]", "vlm.kinds.column=family")
    with pytest.raises(DataError, match=r"vlm\.kinds\.eval: \['sum'\] not found in .*eval\.parquet \(it has no "
                                        r"'family' column\)"):
        load_data(cfg, assets, processor, announce=False)


@pytest.mark.parametrize("override, message", [
    ("vlm.kinds.sft=[]", r"vlm\.kinds\.sft must be a non-empty list"),
    ("vlm.kinds.rl=[sum, sum]", r"vlm\.kinds\.rl names a kind twice"),
    ("vlm.kinds.evals=[sum]", r"vlm\.kinds\.evals"),  # an unknown key, named in full
])
def test_kinds_config_is_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO, [override])


def test_every_row_names_its_kind_and_larger_digit():
    rows = build_splits(DigitsConfig(seed=0, **SMALL))
    for name in ("sft", "rl", "eval", "pref"):
        for row in rows[name]:
            assert row["larger"] == larger(row["left"], row["right"])
    assert [larger(3, 1), larger(1, 3), larger(2, 2)] == ["left", "right", "equal"]
    kinds = [row["kind"] for row in rows["eval"]]
    assert all(kinds.count(k) == SMALL["num_eval"] // 3 for k in QUESTIONS)  # kinds cycle: 500 each at 1,500
    assert DigitsConfig().num_eval == 3 * 500


def test_stale_demo_assets_are_rewritten(tmp_path):
    """Assets from another version of the demo (here 30 eval rows, not 1,500) are rewritten, not
    trained on; assets a run does not build are left as they are."""
    from megatron_vlm.data.digits import build_demo_assets

    build_demo_assets(tmp_path / "a", 1234, DigitsConfig(seed=1234, **SMALL))
    kept = load_config(DEMO, [f"vlm.assets={tmp_path / 'a'}", "vlm.build_demo_assets=false"])
    ensure_assets(kept)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["counts"]["eval"] == SMALL["num_eval"]
    ensure_assets(load_config(DEMO, [f"vlm.assets={tmp_path / 'a'}"]))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["digits"] == {**DigitsConfig(seed=1234).__dict__} and manifest["counts"]["eval"] == 1500
