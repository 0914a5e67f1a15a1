"""launch/grpo_sweep.py: variants of the GRPO stage resumed from one shared SFT run, on the digits
demo shrunk to a few steps (2 gloo ranks each): the table has a row per variant, each variant
continued from the SFT run's rows, and a variant that adds a KL term resumes at the SFT stage's
end (its reference is the policy entering GRPO) while one resumed inside the stage is refused."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("grpo_sweep", ROOT / "launch" / "grpo_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

SMALL = ["vlm.build_demo_assets=false", "stages=[{kind: sft, steps: 2, batch_size: 8}, {kind: grpo, steps: 2}]",
         "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8", "update.micro_batch_size=8",
         "eval.samples=8", "eval.max_new_tokens=8", "eval.every=2", "vlm.export=false", "train.checkpoint.every=1",
         # a reward that varies for a random policy (the demo's strict format would score it all 0)
         "reward={verifiers: {digits: 'tests.trainer.resume_rewards:shaped'}, strict_format: {digits: false}, "
         "num_workers: 1}"]
KL = "update.loss={name: dapo, kl_type: k3, kl_coef: 0.01}"


@pytest.mark.parametrize("text, message", [
    ("[]", "expected a mapping"),
    ("{sft: []}", "variant name 'sft'"),
    ("{'a b': []}", "variant name 'a b'"),
    ("{a: lr=1}", "variant 'a' must be a list"),
    ("{a: [lr]}", "variant 'a' must be a list of key=value"),
])
def test_a_bad_variants_file_is_named(tmp_path, text, message):
    path = tmp_path / "variants.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        sweep.read_variants(path)


def test_only_keeps_the_named_variants_in_the_files_order():
    variants = {"a": [], "b": ["lr=1"], "c": ["lr=2"]}
    assert list(sweep.select(variants, ["c", "a"], Path("v.yaml"))) == ["a", "c"]
    assert sweep.select(variants, None, Path("v.yaml")) == variants
    with pytest.raises(ValueError, match=r"--only names \['d'\], not in v.yaml"):
        sweep.select(variants, ["a", "d"], Path("v.yaml"))


def test_a_variant_that_changes_the_shared_sft_is_refused():
    config = ROOT / "configs" / "digits_demo.yaml"
    same_sft = "stages=[{kind: sft, steps: 400, batch_size: 32, eval_every: 400}, {kind: grpo, steps: 8, lr: 0.001}]"
    shared = sweep.first_stage_override(config, [], {"plain": [], "grpo_lr": [same_sft]})
    assert json.loads(shared.split("=", 1)[1]) == [{"kind": "sft", "steps": 400, "batch_size": 32, "lr": None,
                                                    "reset_optimizer": False, "eval_every": 400}]
    with pytest.raises(ValueError, match="variant 'longer' changes the first stage"):
        sweep.first_stage_override(config, [], {"longer": ["stages=[{kind: sft, steps: 9}]"]})


def test_the_tracked_variants_load_and_share_the_main_jobs_sft():
    """launch/main_job_grpo_variants.yaml against configs/digits_demo.yaml: every variant is a
    loadable config whose first stage is the main job's (else the sweep refuses it only at run time)."""
    from megatron_vlm.config import load_config

    config, path = ROOT / "configs" / "digits_demo.yaml", ROOT / "launch" / "main_job_grpo_variants.yaml"
    variants = sweep.read_variants(path)
    assert "committed" in variants and variants["committed"] == []
    sweep.first_stage_override(config, [], variants)  # raises naming the variant that differs
    main = load_config(config, [])
    for name, overrides in variants.items():
        cfg = load_config(config, overrides)
        cfg.check(main.runtime.nproc)
        assert cfg.stages[0] == main.stages[0], name


@pytest.mark.dist
@pytest.mark.slow
def test_variants_resume_from_the_shared_sft(tmp_path):
    from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

    out = tmp_path / "sweep"
    build_demo_assets(out / "seed_0" / "assets", 0,
                      DigitsConfig(seed=0, num_sft=16, num_rl=24, num_eval=8, num_pref=4, num_text=4))
    variants = tmp_path / "variants.yaml"
    variants.write_text(f"plain: []\nkl: ['{KL}']\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "launch/grpo_sweep.py", "--seeds", "0", "--variants", str(variants),
                           "--out", str(out), "--set", *SMALL, "--timeout", "600"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text() for p in (out / "seed_0").glob("*.log"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + logs[-3000:]
    results = json.loads((out / "sweep.json").read_text())["results"]["0"]
    assert set(results) == {"plain", "kl"}
    assert all(0 <= fig["max"] <= 1 and fig["training seconds"] > 0 for fig in results.values())
    assert (out / "sweep.md").read_text().count("| 0 | ") == 2
    sft_rows = (out / "seed_0" / "sft" / "metrics.jsonl").read_text().splitlines()
    for name in ("plain", "kl"):
        rows = (out / "seed_0" / name / "metrics.jsonl").read_text().splitlines()
        assert rows[:len(sft_rows)] == sft_rows  # the shared SFT, kept as it was
        assert [json.loads(r)["stage"] for r in rows[len(sft_rows):]] == ["grpo", "grpo"]
    kl_rows = [json.loads(r) for r in (out / "seed_0" / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl_loss" in r for r in kl_rows if r["stage"] == "grpo")  # the KL term ran on a fresh reference
    assert "takes it from the policy as it enters" in (out / "seed_0" / "kl.log").read_text()

    # inside the SFT stage (its step-1 checkpoint) a missing reference cannot be made up: refused
    inside = tmp_path / "inside"
    tag = sweep.fork(out / "seed_0" / "sft", inside, tag="step0000001-sft0")
    refused = subprocess.run([sys.executable, "-m", "megatron_vlm.cli", "train", "--config", "configs/digits_demo.yaml",
                              "runtime.seed=0", f"vlm.assets={out / 'seed_0' / 'assets'}", f"train.out_dir={inside}",
                              *SMALL, KL, "--resume", "auto", "--timeout", "600"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0
    assert f"{tag} was saved inside stage 0 (sft) without the 'reference' model" in refused.stdout + refused.stderr
