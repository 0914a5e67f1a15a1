"""GRPO settings compared from one SFT checkpoint: the main job's SFT stage runs once per seed, then
every variant resumes from its end with its own overrides, so the variants differ only in GRPO.

    python launch/grpo_sweep.py --seeds 1234 --variants launch/main_job_grpo_variants.yaml --out runs/sweep

The variants file maps a name to a list of `key=value` overrides of the config (default
configs/digits_demo.yaml; an empty list is the config as committed). Per seed, `OUT/seed_<s>/sft`
trains the config's first stage alone (its last checkpoint is that stage's end); each variant
then gets a copy of that checkpoint and metrics in `OUT/seed_<s>/<name>` and is resumed there
(`--resume auto`) with the whole stage list and its overrides (`--set` ones apply to every run,
the shared SFT included). A variant may add a KL term: resumed at the SFT stage's end, the next
stage takes its reference policy from the policy as it enters, as an uninterrupted run would.

Written: `OUT/sweep.md`, one row per seed and variant: the headline kind's held-out accuracy (with
the left / right / weaker side of `eval.slice_by: [larger]`), overall and strict accuracy, each
kind, and the GRPO part's training seconds (step times, evaluations excluded); `OUT/sweep.json`,
the same figures. Runs go one at a time (2 ranks each); `--reuse` keeps finished ones; `--only`
runs some of the file's variants.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_sft_rl", ROOT / "launch" / "compare_sft_rl.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)
COLUMNS = ["max", "max, left digit larger", "max, right digit larger", "max, weaker side (lower of the two)",
           "overall", "overall strict"]


def read_variants(path: Path) -> dict[str, list[str]]:
    """{name: [override, ...]} from the variants file, each name a plain folder name."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of variant name to a list of key=value overrides")
    for name, overrides in data.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or name == "sft":
            raise ValueError(f"{path}: variant name {name!r} must be letters, digits, '_' or '-' (and not 'sft')")
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"{path}: variant {name!r} must be a list of key=value strings, got {overrides!r}")
    return data


def select(variants: dict[str, list[str]], only: list[str] | None, path: Path) -> dict[str, list[str]]:
    """The variants named in `only` (all when None), in the file's order; an unknown name is refused."""
    if only is None:
        return variants
    unknown = sorted(set(only) - set(variants))
    if unknown:
        raise ValueError(f"--only names {unknown}, not in {path} (it has {sorted(variants)})")
    return {name: o for name, o in variants.items() if name in only}


def first_stage_override(config: Path, common: list[str], variants: dict[str, list[str]]) -> str:
    """`stages=[...]` holding only the config's first stage (the SFT the variants share); a variant
    that changes that stage is refused, naming it."""
    from megatron_vlm.config import load_config

    first = load_config(config, common).stages[0]
    for name, overrides in variants.items():
        if load_config(config, common + overrides).stages[0] != first:
            raise ValueError(f"variant {name!r} changes the first stage ({first.kind}), which the variants share")
    return "stages=" + json.dumps([dataclasses.asdict(first)])


def fork(sft_run: Path, out: Path, tag: str | None = None) -> str:
    """Copy the SFT run's checkpoint `tag` (default: its last) and its metrics into `out`, marked
    latest; the tag."""
    tag = tag or (sft_run / "checkpoints" / "latest").read_text().strip()
    if out.exists():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(sft_run / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag + "\n")
    shutil.copy2(sft_run / "metrics.jsonl", out / "metrics.jsonl")  # the resume keeps the rows up to the tag
    return tag


def train(config: Path, seed: int, assets: Path, out: Path, extra: list[str], timeout: float) -> None:
    command = [sys.executable, "-m", "megatron_vlm.cli", "train", "--config", str(config), f"runtime.seed={seed}",
               f"vlm.assets={assets}", f"train.out_dir={out}", *extra, "--timeout", str(timeout)]  # extra: flags last
    print("+ " + " ".join(command), flush=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))


def figures(rows: list[dict], kinds: list[str]) -> dict[str, float]:
    """The last evaluation's figures, with the training seconds after the shared SFT stage."""
    final = compare.final_figures(rows, kinds)
    first = next(r["stage"] for r in rows if r["stage"] != "init")
    shared = compare.final_figures(rows, kinds, stage=first)["training seconds"]
    return {**final, "training seconds": final["training seconds"] - shared}


def table(results: dict[int, dict[str, dict[str, float]]], kinds: list[str]) -> str:
    names = COLUMNS + [k for k in kinds if k != "max"] + ["training seconds"]
    lines = ["| seed | variant | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for seed, by_variant in results.items():
        for variant, fig in by_variant.items():
            cells = [f"{fig[n]:.0f}" if "seconds" in n else f"{100 * fig[n]:.1f}%" if n in fig else "—"
                     for n in names]
            lines.append(f"| {seed} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, the shared SFT included (a variant's own win)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (those with a .done file)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these variants of the file, not all")
    args = parser.parse_args(argv)
    variants = select(read_variants(args.variants), args.only, args.variants)
    shared_sft = first_stage_override(args.config, args.set, variants)
    results: dict[int, dict] = {}
    for seed in args.seeds:
        base, assets = args.out / f"seed_{seed}", args.out / f"seed_{seed}" / "assets"
        base.mkdir(parents=True, exist_ok=True)
        for name, extra in [("sft", [*args.set, shared_sft, "--overwrite"])] + [
                (name, [*args.set, *overrides, "--resume", "auto"]) for name, overrides in variants.items()]:
            done = base / f"{name}.done"
            if args.reuse and done.exists():
                continue
            if name != "sft":
                fork(base / "sft", base / name)
            train(args.config, seed, assets, base / name, extra, args.timeout)
            done.write_text("done\n")
        rows = {name: compare.read_rows(base / name) for name in variants}
        last = next(r for r in reversed(next(iter(rows.values()))) if "eval_accuracy" in r)
        kinds = sorted(k.split("/")[-1] for k in last if k.startswith("eval/samples/") and "=" not in k)
        results[seed] = {name: figures(r, kinds) for name, r in rows.items()}
    text = table(results, kinds)
    (args.out / "sweep.md").write_text(text + f"\nCommit {compare.commit_of(ROOT)}; config {args.config.name}; "
                                       f"variants {args.variants}.\n")
    (args.out / "sweep.json").write_text(json.dumps({"variants": variants, "results": results}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
