"""launch/gpu_smoke.sh on a machine without a GPU: the dry run lists every stage and its command,
a real run refuses before installing anything, the train commands parse into valid configs through
the CLI's own parser and config loader, the bench command through the benchmark's parser, and each
stage's result check reads what the real commands write (the slow tests run them on CPU)."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu_smoke.sh"
STAGES = ["cuda", "install", "imports", "kernels_fp32", "kernels_bf16", "bench_fp32", "bench_bf16",
          "train_embedded", "train_vllm"]


def load_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "launch" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


smoke = load_smoke()


def run_script(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in ("WHEELS", "SMOKE_DRY_RUN", "SMOKE_OUT")}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**base, "PYTHON": sys.executable, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def commands(out: str) -> dict[str, list[list[str]]]:
    """The dry run's listing: stage -> its commands, split as the shell would."""
    listing, stage = {}, None
    for line in out.splitlines():
        if line.startswith("[") and "] timeout " in line:
            stage = line[1:line.index("]")]
            listing[stage] = []
        elif line.startswith("  $ ") and stage:
            listing[stage].append(shlex.split(line[4:]))
    return listing


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_lists_every_stage_and_reports_no_cuda(tmp_path, how):
    wheels, out_dir = tmp_path / "wheels", tmp_path / "out"
    args, env = ["--out", str(out_dir)], {"WHEELS": str(wheels)}
    if how == "flag":
        args.append("--dry-run")
    else:
        env["SMOKE_DRY_RUN"] = "1"
    result = run_script(*args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    if not torch.cuda.is_available():
        assert "device: exit 1: no CUDA device" in out and "a real run stops here" in out
    listing = commands(out)
    assert list(listing) == STAGES
    deps, package = listing["install"]
    assert deps[1:6] == ["-m", "pip", "install", "--no-index", "--find-links"] and deps[6] == str(wheels)
    assert "megatron-core==0.16.1" in deps and deps[deps.index("--constraint") + 1].endswith("held-constraints.txt")
    named = [arg.split("=")[0].split(">")[0].split("<")[0].lower() for arg in deps[7:]]
    assert not {"torch", "triton", "apex", "vllm", "transformer-engine"} & set(named), named
    assert package[-4:] == ["--no-deps", "--no-build-isolation", "-e", str(ROOT)] and "--no-index" in package
    for dtype in ("float32", "bfloat16"):
        short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
        assert listing[f"kernels_{short}"] == [[sys.executable, str(ROOT / "launch" / "gpu_smoke_kernels.py"),
                                                "--dtype", dtype]]
        bench = listing[f"bench_{short}"][0]
        assert bench[1:5] == ["-m", "megatron_vlm.cli", "bench", "kernels"]
        assert bench[bench.index("--dtype") + 1] == dtype
        assert bench[bench.index("--providers") + 1] == "naive,fused_torch,triton"
    for stage, config in [("train_embedded", "configs/digits_demo.yaml"), ("train_vllm", "configs/digits_demo_vllm.yaml")]:
        train = listing[stage][0]
        assert train[1:6] == ["-m", "megatron_vlm.cli", "train", "--config", config]
        assert {"runtime.nproc=1", "runtime.device=cuda", "parallel.ep=1"} <= set(train)
    assert "TRITON_INTERPRET, MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE unset" in out
    assert "held (held-constraints.txt): torch==" in out
    assert not out_dir.exists()  # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the refusal on a machine without a GPU")
def test_without_cuda_refuses_before_installing_anything(tmp_path):
    out_dir = tmp_path / "out"
    result = run_script("--out", str(out_dir), env={"WHEELS": str(tmp_path / "wheels")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device" in result.stderr and "nothing installed or run" in result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == STAGES
    assert "FAIL" in table[1] and all("not run" in row for row in table[2:])
    assert "[install] $" not in result.stdout
    assert sorted(p.name for p in (out_dir / "logs").iterdir()) == ["cuda.log"]


def parsed_train_command(tmp_path, *, vllm, te):
    from megatron_vlm.cli import build_parser
    from megatron_vlm.config import load_config

    settings = smoke.Settings(out=tmp_path, wheels=None, has_te=te, has_vllm=True)
    (command,) = smoke.train_stage(settings, vllm=vllm).commands
    assert command[:3] == [sys.executable, "-m", "megatron_vlm.cli"]
    args = build_parser().parse_args(command[3:])  # the CLI's own parser: flags and overrides
    assert args.func.__name__ == "cmd_train"
    return load_config(ROOT / args.config, args.overrides)


@pytest.mark.parametrize("vllm", [False, True])
@pytest.mark.parametrize("te", [False, True])
def test_train_overrides_parse_into_a_valid_world_size_1_cuda_config(tmp_path, vllm, te):
    cfg = parsed_train_command(tmp_path, vllm=vllm, te=te)
    cfg.check(1)  # what `megatron-vlm train` checks first: layout, weights source, stages
    cfg.rl.check(cfg.rollout)  # and vlm_run.run next
    assert cfg.world_size() == 1 and cfg.runtime.nproc == 1 and cfg.parallel.ep == 1
    assert cfg.runtime.device == "cuda"
    assert [(s.kind, s.steps) for s in cfg.stages] == [("sft", 2), ("grpo", 2)]
    assert cfg.rollout.drop_equal_groups is False and cfg.update.loss.kl_type == "k3"
    assert cfg.eval.samples == 8
    assert cfg.vlm.random_init and cfg.vlm.build_demo_assets and cfg.vlm.assets == str(tmp_path / "assets")
    assert cfg.train.out_dir == str(tmp_path / ("train_vllm" if vllm else "train_embedded"))
    assert cfg.runtime.backend.layer_spec == ("auto" if te else "local")
    assert cfg.rl.engine == ("vllm" if vllm else "embedded")
    if vllm:
        assert cfg.rl.vllm.gpu_memory_utilization == 0.3 and cfg.rl.vllm.enforce_eager


def test_vllm_stage_is_skipped_without_vllm(tmp_path):
    settings = smoke.Settings(out=tmp_path, wheels=None, has_te=False, has_vllm=False)
    assert smoke.train_stage(settings, vllm=True).skip == "vLLM absent: skipped"
    assert smoke.train_stage(settings, vllm=False).skip is None


def test_bench_command_parses_with_the_benchmarks_own_flags(tmp_path):
    from kernels.bench.__main__ import parse_args
    from kernels.bench.head import PROVIDERS
    from megatron_vlm.cli import build_parser

    settings = smoke.Settings(out=tmp_path, wheels=None)
    (command,) = smoke.bench_stage(settings, "bfloat16").commands
    cli = build_parser().parse_args(command[3:])
    assert cli.func.__name__ == "cmd_bench" and cli.what == "kernels"
    args = parse_args(cli.rest)
    assert set(args.providers.split(",")) <= set(PROVIDERS) and args.suite == "head"
    assert (args.tokens, args.vocab, args.hidden, args.dtype) == ("4096", "32768", "1024", "bfloat16")
    assert args.json == str(tmp_path / "bench_bf16.json")


def test_requirements_come_from_setup_py_without_torch_triton_or_apex():
    reqs = smoke.requirements()
    assert "megatron-core==0.16.1" in reqs and any(r.startswith("pytest") for r in reqs)
    assert not [r for r in reqs if r.lower().startswith(("torch", "triton", "apex"))]


def test_stage_results_failures_timeouts_and_skips(tmp_path):
    ok = smoke.Stage("a", [[sys.executable, "-c", "print('first')"], [sys.executable, "-c", "print('second')"]], 30)
    failing = smoke.Stage("b", [[sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                                [sys.executable, "-c", "print('never')"]], 30)
    slow = smoke.Stage("c", [[sys.executable, "-c", "import time; time.sleep(30)"]], 1)
    wrong = smoke.Stage("d", [[sys.executable, "-c", "print('{}')"]], 30, figure=smoke.kernels_figure)
    skipped = smoke.Stage("e", [], 30, skip="vLLM absent: skipped")
    results = [smoke.run_stage(stage, tmp_path) for stage in (ok, failing, slow, wrong, skipped)]
    assert [(r.status, r.figure) for r in results[:2]] == [("ok", "second"), ("FAIL", "exit 3: boom")]
    assert results[2].status == "timeout" and results[2].seconds < 20
    assert results[3].status == "FAIL" and "failed" in results[3].figure  # KeyError from a bad summary
    assert (results[4].status, results[4].figure) == ("skipped", "vLLM absent: skipped")
    assert "never" not in (tmp_path / "b.log").read_text()
    table = smoke.format_table(results)
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:5]] == ["stage", "status", "figure", "seconds"]
    assert [r.failed for r in results] == [False, True, True, True, False]


def test_result_checks_reject_bad_outputs(tmp_path):
    record = lambda p, s, m: {"provider": p, "T": 4096, "V": 32768, "full_s": s, "peak_extra_mib": m}  # noqa: E731
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"head": [record("naive", 0.02, 1552), record("fused_torch", 0.02, 217),
                                         record("triton", 0.005, 200)]}))
    assert smoke.bench_figure(path) == ("time/mem vs naive (20 ms, 1552 MiB): fused_torch 1.00x/0.14x, "
                                        "triton 0.25x/0.13x")
    path.write_text(json.dumps({"head": [record("naive", 0.02, 1552), {"provider": "triton", "T": 1, "V": 1,
                                                                       "error": ["RuntimeError: bad"]}]}))
    with pytest.raises(smoke.StageFailed, match="triton"):
        smoke.bench_figure(path)
    with pytest.raises(smoke.StageFailed, match="1 of 3 checks failed"):
        smoke.kernels_figure('{"passed": 2, "failed": 1, "device": "x"}')
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"stage": "init"}, {"stage": "sft", "loss": 1.0}]))
    with pytest.raises(smoke.StageFailed, match="logged stages"):
        smoke.train_figure(metrics, "te")


def test_imports_probe_reports_versions_and_optional_packages():
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_smoke.py"), "--probe", "imports"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    figure = smoke.imports_figure(result.stdout)
    assert figure.startswith("mcore 0.16.1, transformers ")
    assert ", TE " in figure and ", vLLM " in figure


@pytest.mark.slow
@pytest.mark.parametrize("dtype,count", [("float32", 15), ("bfloat16", 5)])  # with the chunked backward
def test_kernel_checks_run_the_test_functions_interpreted_on_cpu(dtype, count):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_smoke_kernels.py"), "--dtype", dtype,
                             "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert smoke.kernels_figure(result.stdout) == f"{count} checks vs reference, Triton on cpu (interpreted)"


@pytest.mark.slow
def test_bench_figure_reads_a_real_benchmark_run(tmp_path):
    """The bench stage's command at a toy size, Triton interpreted: its JSON is what the check reads."""
    (command,) = smoke.bench_stage(smoke.Settings(out=tmp_path, wheels=None), "float32").commands
    small = {"--tokens": "64", "--vocab": "512", "--hidden": "32", "--reps": "1", "--warmup": "0"}
    command = [small.get(prev, arg) for prev, arg in zip([None, *command], command)]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused_torch" in smoke.bench_figure(tmp_path / "bench_fp32.json")


@pytest.mark.slow
def test_train_stage_command_runs_on_cpu(tmp_path):
    """The embedded train stage's exact overrides, with runtime.device=cpu: 2 SFT + 2 GRPO steps at
    world size 1 (gloo here, NCCL on the GPU), and the stage's check of metrics.jsonl passes."""
    settings = smoke.Settings(out=tmp_path, wheels=None, has_te=False, has_vllm=False)
    stage = smoke.train_stage(settings, vllm=False)
    command = ["runtime.device=cpu" if arg == "runtime.device=cuda" else arg for arg in stage.commands[0]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=smoke.stage_env())  # the environment run_stage gives it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figure = stage.figure(result.stdout)
    assert figure.startswith("sft loss ") and "grpo loss" in figure and "spec local" in figure


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:5]] for line in out.splitlines() if line.startswith("| ")][1:]


def test_a_failed_stage_does_not_stop_the_rest_and_sets_the_exit_code(tmp_path, monkeypatch, capsys):
    """The run loop with a device probe that finds a GPU: every stage is recorded, exit 1 on a failure."""
    for name in ("WHEELS", "SMOKE_DRY_RUN", "SMOKE_OUT"):
        monkeypatch.delenv(name, raising=False)
    gpu = '{"device": "NVIDIA H200", "count": 1, "torch": "2.14.0", "cuda": "12.8"}'
    monkeypatch.setattr(smoke, "probe_stage", lambda name, figure: smoke.Stage(
        name, [[sys.executable, "-c", f"print({gpu!r})"]], 30, figure=figure))
    stages = lambda s: [smoke.install_stage(s),  # noqa: E731
                        smoke.Stage("broken", [[sys.executable, "-c", "raise SystemExit('it broke')"]], 30),
                        smoke.Stage("after", [[sys.executable, "-c", "print('ran')"]], 30),
                        smoke.Stage("optional", [], 30, skip="absent: skipped")]
    monkeypatch.setattr(smoke, "plan", stages)
    missing = tmp_path / "no-wheels"
    assert smoke.main(["--out", str(tmp_path / "out"), "--wheels", str(missing)]) == 1
    assert [row[:3] for row in table_rows(capsys.readouterr().out)] == [
        ["cuda", "ok", "NVIDIA H200 x1, torch 2.14.0, CUDA 12.8"],
        ["install", "FAIL", f"wheels folder {missing} not found"], ["broken", "FAIL", "exit 1: it broke"],
        ["after", "ok", "ran"], ["optional", "skipped", "absent: skipped"]]
    monkeypatch.setattr(smoke, "plan", lambda s: [smoke.install_stage(s), *stages(s)[2:]])
    assert smoke.main(["--out", str(tmp_path / "out2")]) == 0  # no wheels: install skipped, not failed
    assert [row[1] for row in table_rows(capsys.readouterr().out)] == ["ok", "skipped", "ok", "skipped"]


def test_install_preflight_holds_the_installed_torch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    settings = smoke.Settings(out=tmp_path, wheels=wheels)
    assert smoke.install_preflight(settings) is None
    held = (tmp_path / "held-constraints.txt").read_text().splitlines()
    assert f"torch=={torch.__version__}" in held
    assert smoke.install_stage(settings).commands[0][-len(smoke.requirements()):] == smoke.requirements()


def test_stages_do_not_inherit_a_rendezvous(monkeypatch):
    """Each stage is a world of one: a MASTER_PORT left in the environment (a launcher's, or this
    test process's own bound store after single_rank_runtime) made the train stage's store fail to
    listen (EADDRINUSE) in the full suite."""
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    env = smoke.stage_env()
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} & set(env)
    assert env["PYTHONUNBUFFERED"] == "1"
