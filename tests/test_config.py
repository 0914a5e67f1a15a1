"""Config loading, overrides and the one-line errors a broken config or layout gives."""
from pathlib import Path

import pytest

from megatron_vlm.cli import main
from megatron_vlm.config import RunConfig, load_config, parse_overrides
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rl.config import RolloutConfig


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["parallel.tp=2", "model.dense_layers=[0, 1]", "train.out_dir=x"]) == {
        "parallel": {"tp": 2}, "model": {"dense_layers": [0, 1]}, "train": {"out_dir": "x"}}


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  tp: 2\nmodel:\n  num_layers: 4\n")
    cfg = load_config(recipe, ["model.num_layers=6"])
    assert (cfg.parallel.tp, cfg.model.num_layers, cfg.model.hidden_size) == (2, 6, RunConfig().model.hidden_size)


@pytest.mark.parametrize("overrides, message", [
    (["model.hiden_size=3"], "unknown config key 'model.hiden_size'"),
    (["paralel.tp=2"], "unknown config key 'paralel'"),
    (["parallel.tp=0"], "parallel.tp must be a positive integer, got 0"),
    (["parallel.token_dispatcher=flex"], "parallel.token_dispatcher"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["parallel.ep=1", "parallel.etp=2"], "parallel.etp"),
    (["model=3"], "config section model must be a mapping"),
    (["vlm.load.max_prompt_length=64"], "set vlm.max_prompt_length, not vlm.load.max_prompt_length"),
    # the trainer would score the engine's samples under another distribution (the sync check fails)
    (["rollout.temperature=1.2", "update.temperature=1.0"], "update.temperature (1.0) must equal rollout.temperature (1.2)"),
    (["rollout.temperature=0.7", "update.temperature=0.6"], "set update.temperature=0.7 or leave it unset"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_update_temperature_follows_a_sampling_rollout_only():
    assert load_config(None, ["rollout.temperature=1.2", "update.temperature=1.2"]).update.temperature == 1.2
    assert load_config(None, ["rollout.temperature=1.2"]).update.temperature == 1.2  # unset: follows
    assert load_config(None, ["rollout.temperature=1.2", "update.micro_batch_size=4"]).update.temperature == 1.2
    assert load_config(None, ["rollout.temperature=0"]).update.temperature == 1.0  # greedy: the default
    assert load_config(None, ["rollout.temperature=0", "update.temperature=1.0"]).rollout.temperature == 0  # greedy
    with pytest.raises(ValueError, match="update.temperature"):
        RunConfig(rollout=RolloutConfig(temperature=0.7))  # built directly, nothing to follow


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2"], 3, r"world size 3 is not divisible by tp\*pp\*cp = 2\*1\*1 = 2"),
    (["parallel.ep=3"], 6, r"parallel.ep \(3\) does not divide model.num_experts \(4\)"),
    (["parallel.pp=3"], 3, r"model.num_layers \(2\) is not divisible by parallel.pp \(3\)"),
    (["parallel.cp=2", "train.seq_length=66"], 2, "train.seq_length"),
    (["parallel.tp=4"], 4, "num_query_groups"),
    (["parallel.tp=2", "model.vocab_size=107"], 2, r"model.vocab_size \(107\) is not divisible by parallel.tp \(2\)"),
])
def test_layout_errors(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides).check(world)


def test_cli_reports_layout_error_in_one_line_before_any_process_group():
    import subprocess
    import sys
    import time

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "megatron_vlm.cli", "train", "--config",
                             "configs/lm_demo.yaml", "parallel.ep=3"], capture_output=True, text=True)
    err = result.stderr.strip()
    assert result.returncode == 2
    assert err.count("\n") == 0 and "parallel.ep (3) does not divide model.num_experts (4)" in err
    assert "rank" not in result.stdout + err  # no rank was started, so no process group exists
    assert time.monotonic() - start < 60


def test_plan_for_a_realistic_cluster(capsys):
    assert main(["plan", "--config", "configs/qwen3_vl_30b_a3b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "TP=2 x PP=2 x CP=1 x DP=8 = 32" in out and "EP=8" in out
    # Qwen3-VL-30B-A3B from its HF config: language 30.53B (3.35B active) + vision tower 0.54B
    assert "31.07B parameters, 3.89B active (vision tower 538.63M)" in out
    assert "0-23" in out and "24-47" in out


def test_parallel_config_sizes():
    p = ParallelConfig(tp=2, pp=2, ep=8, etp=1)
    assert p.data_parallel_size(32) == 8 and p.expert_data_parallel_size(32) == 2
    assert ParallelConfig(tp=2).expert_tp == 2 and ParallelConfig(tp=2).use_sequence_parallel


def test_optional_and_list_sections():
    cfg = load_config(None, ["rl.dynamic_sampling={batch_groups: 4}", "stages=[{kind: sft, steps: 2}]"])
    assert cfg.rl.dynamic_sampling.batch_groups == 4 and cfg.rl.dynamic_sampling.max_draws == 10
    assert cfg.stages[0].kind == "sft" and cfg.stages[0].steps == 2
    assert load_config(None, ["rl.dynamic_sampling=null"]).rl.dynamic_sampling is None
    unset = load_config(None, ["rl.dynamic_sampling={max_draws: 2}", "rollout.prompts_per_step=3"])
    assert unset.rl.dynamic_sampling.batch_groups is None  # the batch follows the prompts per step
    unset.rl.check(unset.rollout)
    full = load_config(None, ["rl.dynamic_sampling={batch_groups: 7, max_draws: 2}", "rollout.prompts_per_step=3"])
    with pytest.raises(ValueError, match=r"batch_groups \(7\) can never be filled"):
        full.rl.check(full.rollout)
    with pytest.raises(ValueError, match=r"unknown config key 'stages\[0\].stepz'"):
        load_config(None, ["stages=[{kind: sft, stepz: 2}]"])
    with pytest.raises(ValueError, match="dynamic_sampling.batch_groups must be >= 1"):
        load_config(None, ["rl.dynamic_sampling={batch_groups: 0}"])


def test_recipe_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("parallel:\n  tp: 2\n  pp: 2\nstages:\n  - {kind: sft, steps: 5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(
        "base: ../base.yaml\nparallel:\n  pp: 1\nstages:\n  - {kind: grpo, steps: 3}\n")
    cfg = load_config(tmp_path / "sub" / "r.yaml")
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 1)          # mappings merge key by key
    assert [(s.kind, s.steps) for s in cfg.stages] == [("grpo", 3)]  # lists are replaced
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="base chain loops"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "gone.yaml")


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        cfg = load_config(path)
        if cfg.is_vlm:
            cfg.rl.check(cfg.rollout)
            cfg.vlm.check_weights_source()  # real weights, or random init asked for by name


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_vlm_run_without_a_weights_source_is_refused_before_launch(capsys):
    grpo = str(CONFIGS / "qwen3_vl_30b_a3b_grpo.yaml")
    with pytest.raises(ValueError, match="vlm.init_from is not set: name the weights"):
        load_config(grpo, ["vlm.init_from=null"]).check(32)
    for command in ("plan", "train"):  # the check both run before any process starts
        assert main([command, "--config", grpo, "vlm.init_from=null"]) == 2
        assert "vlm.init_from is not set" in capsys.readouterr().err
    demo = str(CONFIGS / "digits_demo.yaml")
    with pytest.raises(ValueError, match="or set vlm.random_init: true"):
        load_config(demo, ["vlm.random_init=false"]).check(2)
    load_config(demo).check(2)  # the demo asks for random init


def test_weights_and_random_init_together_are_refused():
    with pytest.raises(ValueError, match=r"vlm.init_from \(w\) and vlm.random_init: true both set"):
        load_config(CONFIGS / "digits_demo.yaml", ["vlm.init_from=w"])


@pytest.mark.parametrize("overrides, message", [
    (["stages=[{kind: sft, steps: 2.5}]"], "stages[0].steps: expected int, got 2.5"),
    (["vlm.export='no'"], "vlm.export: expected bool, got 'no'"),
    (["rollout.temperature=hot"], "rollout.temperature: expected float, got 'hot'"),
    (["rollout.n=true"], "rollout.n: expected int, got True"),                # YAML true is no int
    (["rollout.top_p=false"], "rollout.top_p: expected float, got False"),
    (["train.out_dir=3"], "train.out_dir: expected str, got 3"),
    (["runtime.device=5"], "runtime.device: expected str | null, got 5"),
    (["optim.lr=1e-6"], "optim.lr: expected float, got '1e-6' (YAML reads a number without a dot"),
    (["model.dense_layers=[0, 1, x]"], "model.dense_layers[2]: expected int, got 'x'"),
    (["model.dense_layers=3"], "model.dense_layers: expected list[int], got 3"),
    (["stages=3"], "stages: expected list[StageConfig], got 3"),
    (["stages=[{kind: sft, steps: 2, eval_every: true}]"], "stages[0].eval_every: expected int | null, got True"),
    (["stages=[{kind: sft, steps: 2, eval_every: 0}]"], "stages[] sft: eval_every must be >= 1 or null, got 0"),
    (["vlm.prompt_sources=[{path: [a.jsonl, 3]}]"], "vlm.prompt_sources[0].path[1]: expected str, got 3"),
    (["vlm.prompt_sources=[{path: 3}]"], "vlm.prompt_sources[0].path: expected str | list[str], got 3"),
    (["reward={verifiers: {a: math}, weights: {a: heavy}}"], "reward.weights.a: expected float, got 'heavy'"),
    (["reward={verifiers: {1: math}}"], "reward.verifiers key 1: expected str, got 1"),
    (["rl.prompt_mix={pool_key: t, curriculum: {stages: [{a: 1}, {b: x}]}}"],
     "rl.prompt_mix.curriculum.stages[1].b: expected float, got 'x'"),
    (["rl.vllm.extra_llm_kwargs=3"], "rl.vllm.extra_llm_kwargs: expected dict, got 3"),
])
def test_values_of_the_wrong_type_name_their_full_path(overrides, message):
    with pytest.raises(ValueError) as caught:
        load_config(None, overrides)
    assert str(caught.value).startswith(message), str(caught.value)


def test_values_of_the_right_type_load_and_ints_become_floats():
    cfg = load_config(None, ["rollout.temperature=1", "reward={verifiers: {a: math}, weights: {a: 2}}",
                             "vlm.prompt_sources=[{path: a.jsonl}, {path: [b.jsonl, c.jsonl], ratio: 2}]",
                             "parallel.etp=null", "vlm.export=false", "rl.vllm.extra_llm_kwargs={x: [1]}"])
    assert cfg.rollout.temperature == 1.0 and type(cfg.rollout.temperature) is float
    assert type(cfg.reward.weights["a"]) is float and type(cfg.vlm.prompt_sources[1].ratio) is float
    assert [s.path for s in cfg.vlm.prompt_sources] == ["a.jsonl", ["b.jsonl", "c.jsonl"]]
    assert cfg.parallel.etp is None and cfg.vlm.export is False and cfg.rl.vllm.extra_llm_kwargs == {"x": [1]}


def _reachable_dataclasses(cls, path: str, seen: dict) -> dict:
    """{dataclass: the path of its first field} for every dataclass a RunConfig field can hold."""
    import dataclasses
    import typing

    seen.setdefault(cls, path)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        stack = [hints[f.name]]
        while stack:
            hint = stack.pop()
            if dataclasses.is_dataclass(hint) and hint not in seen:
                _reachable_dataclasses(hint, f"{path}{f.name}.", seen)
            stack.extend(typing.get_args(hint))
    return seen


def test_every_default_of_every_section_has_its_annotated_type():
    import dataclasses
    import typing

    from megatron_vlm.config import _typed_value

    classes = _reachable_dataclasses(RunConfig, "", {})
    assert len(classes) >= 25  # the walk reaches the nested and optional sections too
    for cls, path in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue  # required: the recipes below give it
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
            _typed_value(hints[f.name], default, f"{path}{f.name}")


def test_every_recipe_in_configs_loads_with_its_base_chain():
    recipes = sorted(CONFIGS.rglob("*.yaml"))
    chained = [p for p in recipes if "base:" in p.read_text()]
    assert len(recipes) >= 10 and len(chained) >= 5
    for path in recipes:
        assert isinstance(load_config(path), RunConfig), path


def test_a_vlm_vocabulary_that_tp_does_not_divide_is_named_before_any_process(tmp_path):
    """The digits demo's tokenizer has 107 tokens: TP=2 cannot split its embedding."""
    cfg = load_config(Path("configs/digits_demo.yaml"), ["parallel.ep=1", "parallel.tp=2",
                                                          f"vlm.assets={tmp_path / 'assets'}"])
    with pytest.raises(ValueError, match=r"text_config.vocab_size \(\d+\) is not divisible by parallel.tp \(2\)"):
        cfg.check(2)


def test_a_judge_section_configures_the_judge_verifier():
    cfg = load_config(None, ["judge.path=/models/judge", "judge.batch_size=4",
                             "reward={verifiers: {open: judge}}"])
    assert cfg.judge.path == "/models/judge" and cfg.judge.batch_size == 4
    assert cfg.reward.verifiers == {"open": "judge"}
    with pytest.raises(ValueError, match="judge.batch_size must be >= 1"):
        load_config(None, ["judge.batch_size=0"])


def test_the_launchers_layout_check_imports_no_megatron(tmp_path):
    """`megatron-vlm train` checks a VLM config against its HF config in the launcher process,
    before any rank starts: that process must not pay megatron-core's import (~2-3 s on 2 cores,
    once per launch) for a check that needs none of it."""
    import subprocess
    import sys

    from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

    assets = tmp_path / "assets"
    build_demo_assets(assets, 0, DigitsConfig(seed=0, num_sft=4, num_rl=4, num_eval=4, num_pref=4, num_text=4))
    code = ("import sys; from megatron_vlm.config import load_config; "
            f"cfg = load_config('configs/digits_demo.yaml', ['vlm.assets={assets}']); cfg.check(2); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
