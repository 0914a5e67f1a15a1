"""One rank of the recipes launch (2 gloo ranks): every recipe in configs/recipes/ runs a few
steps of each of its stages on the digits demo task, in one process group. sft_start runs first
and its export is what the others start from, as in the real flow. Writes each run's rows."""
import json
import sys
from pathlib import Path

from megatron_vlm.config import load_config
from megatron_vlm.trainer.vlm_run import run

ROOT = Path(__file__).resolve().parents[2]


def tiny(path: Path, out: Path, assets: Path):
    overrides = [f"vlm.assets={assets}", f"train.out_dir={out / path.stem}", "rollout.prompts_per_step=4",
                 "rollout.n=4", "eval.samples=8", "eval.every=1000", "update.micro_batch_size=8"]
    if path.stem != "sft_start":
        overrides.append(f"vlm.init_from={out / 'sft_start' / 'hf_export'}")
    cfg = load_config(path, overrides)
    for stage in cfg.stages:
        stage.steps, stage.batch_size = 2, min(stage.batch_size, 8)
    if cfg.rl.dynamic_sampling is not None:
        cfg.rl.dynamic_sampling.batch_groups = 3
    return cfg


def main():
    out = Path(sys.argv[1])
    recipes = sorted((ROOT / "configs" / "recipes").glob("*.yaml"), key=lambda p: p.stem != "sft_start")
    report = {}
    for path in recipes:
        rows = run(tiny(path, out, out / "assets"), keep_runtime=True)
        report[path.stem] = rows
    if rows:  # rank 0 holds the rows
        (out / "recipes.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
