"""The GPU smoke test behind `launch/gpu_smoke.sh`: prove the GPU path on one fresh GPU in minutes.

    WHEELS=/path/to/wheels bash launch/gpu_smoke.sh     # or: --wheels DIR; --out DIR; --dry-run

Stages, in order; each is a subprocess under coreutils `timeout`, its output streamed and kept in
OUT/logs/STAGE.log, and a failure is recorded without stopping the stages after it:
  cuda            torch sees a CUDA device; without one the run stops here, before installing anything
  install         from the wheels folder only (--no-index): megatron-core 0.16.1 and the rest of
                  setup.py's requirements, with torch and triton held at the installed versions by a
                  constraint file (a CPU torch can never replace the CUDA one; a requirement that would
                  need another torch fails instead), then the package itself with --no-deps. apex is
                  never named: the PyPI `apex` is an unrelated toolkit (parallel/optional.py).
                  Transformer Engine and vLLM are not installed: used where present, skipped where not.
  imports         torch + device, triton, megatron.core, transformers; TE and vLLM: version or absent
  kernels_*       tests/kernels' reference comparisons on the device, Triton path (gpu_smoke_kernels.py)
  bench_*         `megatron-vlm bench kernels` at the README's target shape: naive vs fused torch vs
                  Triton, time and peak memory (errors inside the benchmark fail the stage)
  train_embedded  the digits demo VLM, 2 SFT + 2 GRPO steps at world size 1 on cuda (NCCL), embedded
                  engine; Transformer Engine's layer spec where TE is installed, megatron's local one
                  where not
  train_vllm      the same with rl.engine vllm (configs/digits_demo_vllm.yaml), where vLLM is installed
Then one table (stage | status | figure | seconds); exit 1 if a stage that ran failed, 2 if there is
no CUDA device. `--dry-run` (or SMOKE_DRY_RUN=1) probes the device and prints every stage's command
without running it.

Standard library only at import: this runs before the project's requirements are installed (the
`--probe` functions import them, each in its own stage process). Commands use
`python -m megatron_vlm.cli`, the `megatron-vlm` entry point, with this interpreter, so a
`megatron-vlm` of another environment on PATH cannot be picked up.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-m", "megatron_vlm.cli"]
HELD = ("torch", "triton", "pytorch-triton")  # never reinstalled: the CUDA builds already here
BENCH_PROVIDERS = ("naive", "fused_torch", "triton")
# The README's target shape (T=4096, H=1024, V=32768; the naive path needs ~1.5 GiB): seconds on a GPU.
BENCH_SHAPE = dict(tokens=4096, hidden=1024, vocab=32768)
# Seconds per stage: several times what each should take on one H100/H200 (the whole run: < 8 min),
# so a hang is cut off without a slow machine failing.
TIMEOUTS = dict(cuda=60, install=240, imports=120, kernels=180, bench=180, train=300, train_vllm=420)
# None: removed. The rendezvous variables too: each stage is its own world of one, and an inherited
# MASTER_PORT (a launcher's, or a test process's bound store) would make its store fail to listen.
STAGE_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": None,
             **dict.fromkeys(("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                              "LOCAL_WORLD_SIZE"), None)}


class StageFailed(Exception):
    """A stage exited 0 but its result is wrong (the message becomes the table's figure)."""


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    timeout_s: int
    figure: Callable[[str], str] = lambda output: last_line(output)  # stage output -> table figure
    skip: str | None = None  # why it does not run


@dataclass
class Result:
    stage: str
    status: str  # ok | FAIL | timeout | skipped | not run
    figure: str
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "timeout")


@dataclass
class Settings:
    out: Path
    wheels: Path | None
    has_te: bool = field(default_factory=lambda: module_present("transformer_engine"))
    has_vllm: bool = field(default_factory=lambda: module_present("vllm"))


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def last_line(output: str, width: int = 70) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:width]


def last_json(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageFailed("no JSON summary line in the output")


# ------------------------------------------------------------------------------------- install
def requirements(setup_py: Path = ROOT / "setup.py") -> list[str]:
    """setup.py's install_requires and its `test` extra, less torch / triton (held, not installed)."""
    call = next(node for node in ast.walk(ast.parse(setup_py.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    wanted = kwargs["install_requires"] + kwargs["extras_require"]["test"]
    return [req for req in wanted if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in HELD]


def held_versions() -> dict[str, str]:
    """The installed torch / triton builds, as pip sees them."""
    found = {}
    for dist in HELD:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def install_stage(s: Settings) -> Stage:
    constraints = s.out / "held-constraints.txt"
    if s.wheels is None:
        return Stage("install", [], TIMEOUTS["install"],
                     skip="no wheels folder (WHEELS=DIR or --wheels DIR): the installed packages are used")
    pip = [PY, "-m", "pip", "install", "--no-index", "--find-links", str(s.wheels)]
    deps = [*pip, "--constraint", str(constraints), *requirements()]
    package = [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    return Stage("install", [deps, package], TIMEOUTS["install"], figure=lambda _: f"from {s.wheels}")


def install_preflight(s: Settings) -> str | None:
    """Why the install cannot start, or None after writing the constraint file that holds torch."""
    if not s.wheels.is_dir():
        return f"wheels folder {s.wheels} not found"
    held = held_versions()
    if "torch" not in held:
        return "torch is not installed as a package pip can see: refusing to install (a requirement could pull a CPU torch)"
    (s.out / "held-constraints.txt").write_text("".join(f"{d}=={v}\n" for d, v in held.items()))
    return None


# ------------------------------------------------------------------------------------- probes
def probe_cuda() -> int:
    """`gpu_smoke.py --probe cuda`: the device, or exit 1 saying there is none."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "torch": torch.__version__, "cuda": torch.version.cuda}))
    return 0


def probe_imports() -> int:
    """`gpu_smoke.py --probe imports`: what the GPU path imports, with versions; TE and vLLM are
    optional (absent: skipped) but a TE that is installed and does not import is an error, as on
    cuda the model would refuse it (models/specs.py)."""
    import megatron_vlm  # noqa: F401  first, as in tests/conftest.py (torchvision schemas for vLLM)
    import megatron.core
    import torch
    import transformers
    import triton

    from megatron_vlm.parallel import optional

    optional.check_apex()  # a PyPI `apex` would mislead megatron-core
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
              "triton": triton.__version__, "megatron.core": megatron.core.__version__,
              "transformers": transformers.__version__}
    error = optional.transformer_engine_import_error() if optional.transformer_engine_available() else None
    if not optional.transformer_engine_available():
        report["transformer_engine"] = "absent: skipped"
    elif error is not None:
        report["transformer_engine"] = f"broken: {type(error).__name__}: {error}"
    else:
        import transformer_engine

        report["transformer_engine"] = getattr(transformer_engine, "__version__", "present")
    if optional.vllm_available():
        import vllm

        report["vllm"] = vllm.__version__
    else:
        report["vllm"] = "absent: skipped"
    for key, value in report.items():
        print(f"{key:>18}: {value}")
    print(json.dumps(report))
    return 1 if error is not None else 0


PROBES = {"cuda": probe_cuda, "imports": probe_imports}


def probe_stage(name: str, figure) -> Stage:
    return Stage(name, [[PY, str(Path(__file__).resolve()), "--probe", name]], TIMEOUTS[name], figure=figure)


def cuda_figure(output: str) -> str:
    info = last_json(output)
    return f"{info['device']} x{info['count']}, torch {info['torch']}, CUDA {info['cuda']}"


def imports_figure(output: str) -> str:
    info = last_json(output)
    short = lambda v: v.split(":")[0] if v.startswith(("absent", "broken")) else v  # noqa: E731
    return (f"mcore {info['megatron.core']}, transformers {info['transformers']}, "
            f"TE {short(info['transformer_engine'])}, vLLM {short(info['vllm'])}")


# ------------------------------------------------------------------------------- kernels, bench
def kernels_stage(dtype: str) -> Stage:
    cmd = [PY, str(ROOT / "launch" / "gpu_smoke_kernels.py"), "--dtype", dtype]
    return Stage(f"kernels_{short_dtype(dtype)}", [cmd], TIMEOUTS["kernels"], figure=kernels_figure)


def kernels_figure(output: str) -> str:
    summary = last_json(output)
    if summary["failed"] or not summary["passed"]:
        raise StageFailed(f"{summary['failed']} of {summary['passed'] + summary['failed']} checks failed")
    return f"{summary['passed']} checks vs reference, Triton on {summary['device']}"


def bench_stage(s: Settings, dtype: str) -> Stage:
    out = s.out / f"bench_{short_dtype(dtype)}.json"
    cmd = [*CLI, "bench", "kernels", "--suite", "head", "--providers", ",".join(BENCH_PROVIDERS),
           "--tokens", str(BENCH_SHAPE["tokens"]), "--hidden", str(BENCH_SHAPE["hidden"]),
           "--vocab", str(BENCH_SHAPE["vocab"]), "--dtype", dtype, "--reps", "3", "--warmup", "1",
           "--timeout", "120", "--json", str(out)]
    return Stage(f"bench_{short_dtype(dtype)}", [cmd], TIMEOUTS["bench"], figure=lambda _: bench_figure(out))


def bench_figure(path: Path) -> str:
    """Time and peak-memory ratios to naive; `bench kernels` exits 0 even when a provider failed."""
    records = json.loads(path.read_text())["head"]
    errors = [f"{r['provider']}: {r['error']}" for r in records if "error" in r]
    if errors:
        raise StageFailed("; ".join(map(str, errors)))
    by = {r["provider"]: r for r in records}
    missing = [p for p in BENCH_PROVIDERS if p not in by]
    if missing:
        raise StageFailed(f"no result for {missing}")
    naive = by["naive"]
    ratios = ", ".join(f"{p} {by[p]['full_s'] / naive['full_s']:.2f}x/{by[p]['peak_extra_mib'] / naive['peak_extra_mib']:.2f}x"
                       for p in BENCH_PROVIDERS[1:])
    return f"time/mem vs naive ({naive['full_s'] * 1e3:.0f} ms, {naive['peak_extra_mib']:.0f} MiB): {ratios}"


def short_dtype(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


# -------------------------------------------------------------------------------------- train
def train_overrides(out_dir: Path, assets: Path, *, vllm: bool, te: bool) -> list[str]:
    """The digits demo cut to a smoke test: one GPU, 2 SFT + 2 GRPO steps, a small evaluation.

    A freshly initialised policy scores 0 on every sample, so every group ties: the tie filter is off
    (rollout.drop_equal_groups) and a k3 KL term gives the update a gradient, so the GRPO steps run
    the old / reference log-probs, the weight-sync check and the fused-loss update, not an empty step."""
    overrides = ["runtime.nproc=1", "runtime.device=cuda", "parallel.ep=1",
                 "stages=[{kind: sft, steps: 2, batch_size: 8}, "
                 "{kind: grpo, steps: 2, lr: 0.00005, reset_optimizer: true}]",
                 "rollout.prompts_per_step=4", "rollout.n=4", "rollout.drop_equal_groups=false",
                 "update.loss={name: dapo, kl_type: k3, kl_coef: 0.01}",
                 "eval.samples=8", "eval.every=2", f"vlm.assets={assets}", f"train.out_dir={out_dir}"]
    if not te:
        overrides.append("runtime.backend.layer_spec=local")  # on cuda a missing TE is otherwise an error
    if vllm:  # a 1.2M-parameter model: a small share of the GPU, eager (no CUDA-graph capture time)
        overrides += ["rl.vllm.gpu_memory_utilization=0.3", "rl.vllm.enforce_eager=true"]
    return overrides


def train_stage(s: Settings, *, vllm: bool) -> Stage:
    name = "train_vllm" if vllm else "train_embedded"
    config = "configs/digits_demo_vllm.yaml" if vllm else "configs/digits_demo.yaml"
    out_dir = s.out / name
    cmd = [*CLI, "train", "--config", config,
           *train_overrides(out_dir, s.out / "assets", vllm=vllm, te=s.has_te)]
    spec = "te" if s.has_te else "local (TE absent)"
    skip = "vLLM absent: skipped" if vllm and not s.has_vllm else None
    return Stage(name, [cmd], TIMEOUTS["train_vllm" if vllm else "train"],
                 figure=lambda _: train_figure(out_dir / "metrics.jsonl", spec), skip=skip)


def train_figure(metrics: Path, spec: str) -> str:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    stages = [r["stage"] for r in rows]
    if stages != ["init", "sft", "sft", "grpo", "grpo"]:
        raise StageFailed(f"logged stages {stages}")
    sft, grpo = rows[1:3], rows[3:]
    values = [r["loss"] for r in sft] + [r[k] for r in grpo for k in ("loss", "sync_logprob_mean_abs")]
    if not all(isinstance(v, float) and math.isfinite(v) for v in values):
        raise StageFailed(f"non-finite loss or sync statistic: {values}")
    return (f"sft loss {sft[0]['loss']:.2f}->{sft[1]['loss']:.2f}, grpo loss {grpo[-1]['loss']:.1e}, "
            f"sync mean|d| {max(r['sync_logprob_mean_abs'] for r in grpo):.1e}, spec {spec}")


# ---------------------------------------------------------------------------------------- run
def plan(s: Settings) -> list[Stage]:
    """Every stage after the device probe, in order."""
    return [install_stage(s),
            probe_stage("imports", imports_figure),
            kernels_stage("float32"), kernels_stage("bfloat16"),
            bench_stage(s, "float32"), bench_stage(s, "bfloat16"),
            train_stage(s, vllm=False), train_stage(s, vllm=True)]


def stage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if STAGE_ENV.get(k, v) is not None}
    return env | {k: v for k, v in STAGE_ENV.items() if v is not None}


def run_stage(stage: Stage, log_dir: Path | None) -> Result:
    """Run the stage's commands in turn under one time budget; log_dir None: keep no log."""
    if stage.skip:
        return Result(stage.name, "skipped", stage.skip)
    start, output = time.perf_counter(), []
    with open(log_dir / f"{stage.name}.log" if log_dir else os.devnull, "w") as log:
        for command in stage.commands:
            left = max(1, int(stage.timeout_s - (time.perf_counter() - start)))
            print(f"[{stage.name}] $ {shlex.join(command)}"[:400], flush=True)
            proc = subprocess.Popen(["timeout", "--kill-after=15", str(left), *command], cwd=ROOT,
                                    env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
            for line in proc.stdout:
                print(f"[{stage.name}] {line}", end="", flush=True)
                log.write(line)
                output.append(line)
            rc = proc.wait()
            seconds = time.perf_counter() - start
            if rc in (124, 137):
                return Result(stage.name, "timeout", f"after {stage.timeout_s} s", seconds)
            if rc != 0:
                return Result(stage.name, "FAIL", f"exit {rc}: {last_line(''.join(output), 100)}", seconds)
    try:
        return Result(stage.name, "ok", stage.figure("".join(output)), time.perf_counter() - start)
    except (StageFailed, OSError, KeyError, ValueError) as exc:
        return Result(stage.name, "FAIL", str(exc)[:120], time.perf_counter() - start)


def format_table(results: list[Result]) -> str:
    rows = [("stage", "status", "figure", "seconds")] + [
        (r.stage, r.status, r.figure, f"{r.seconds:.1f}" if r.status not in ("skipped", "not run") else "-")
        for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def dry_run(probe: Result, stages: list[Stage]) -> int:
    print(f"device: {probe.figure}" + ("" if probe.status == "ok" else " (a real run stops here)"))
    unset = [k for k, v in STAGE_ENV.items() if v is None]
    print(f"every stage runs in {ROOT} with {' '.join(f'{k}={v}' for k, v in STAGE_ENV.items() if v)}, "
          f"{', '.join(unset)} unset")
    for stage in [probe_stage("cuda", cuda_figure)] + stages:
        note = f" [skipped: {stage.skip}]" if stage.skip else ""
        print(f"[{stage.name}] timeout {stage.timeout_s} s{note}")
        for command in stage.commands:
            print(f"  $ {shlex.join(command)}")
        if stage.name == "install" and stage.skip:
            print("  (with WHEELS: pip install --no-index --find-links WHEELS --constraint held-constraints.txt"
                  " <setup.py requirements>; pip install --no-index --no-deps -e .)")
    held = held_versions()
    print(f"held (held-constraints.txt): {', '.join(f'{d}=={v}' for d, v in held.items()) or 'torch not found'}")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/gpu_smoke.sh", description=__doc__.splitlines()[0])
    p.add_argument("--wheels", default=os.environ.get("WHEELS") or None, help="folder of wheels (env WHEELS)")
    p.add_argument("--out", default=os.environ.get("SMOKE_OUT") or None, help="work folder (default: a new temp dir)")
    p.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)  # a stage's own process
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("SMOKE_DRY_RUN") == "1",
                   help="print the commands, run nothing but the device probe (env SMOKE_DRY_RUN=1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return PROBES[args.probe]()
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / f"megatron_vlm_smoke.{os.getpid()}"
    s = Settings(out=out.resolve(), wheels=Path(args.wheels).resolve() if args.wheels else None)
    stages = plan(s)
    log_dir = None if args.dry_run else s.out / "logs"  # a dry run writes nothing
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    probe = run_stage(probe_stage("cuda", cuda_figure), log_dir)
    if args.dry_run:
        return dry_run(probe, stages)
    results = [probe]
    if probe.failed:
        print(f"\n{probe.figure}: nothing installed or run", file=sys.stderr)
        results += [Result(stage.name, "not run", "no CUDA device") for stage in stages]
        print("\n" + format_table(results))
        return 2
    for stage in stages:
        problem = install_preflight(s) if stage.name == "install" and not stage.skip else None
        results.append(Result(stage.name, "FAIL", problem) if problem else run_stage(stage, log_dir))
    total = sum(r.seconds for r in results)
    print(f"\nGPU smoke test, {total / 60:.1f} min, logs in {log_dir}\n" + format_table(results))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
