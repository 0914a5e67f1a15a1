"""`python -m kernels.bench` / `megatron-vlm bench kernels`: LM-head + loss and packing benchmarks.

Every (shape, provider) runs in its own process (`kernels.bench.head`), so each peak-memory figure
is that provider's alone; results are printed as a table with ratios to the naive path and written
as JSON. Sweeps take comma-separated --tokens / --vocab / --hidden lists. Defaults:
- CPU: the target shape (fp32, T=4096, H=1024, V=32768, PPO-clip + k3 KL, forward + backward of
  head and loss), providers naive, reference, chunk_recompute, fused_torch (and liger if installed).
- CUDA: bf16, T in {4k, 16k, 64k} x V in {32k, 152k} x H in {2k, 4k}, providers naive,
  compiled_chunk (torch.compile'd chunking), fused_torch, triton and liger if installed. The table
  adds TFLOP/s counted as 6*T*H*V and its share of the bf16 matmul rate measured at the start of
  the same run (an 8192^3 cuBLAS GEMM), and the tile configs autotune chose for the Triton kernels.
A provider that fails (e.g. out of memory at 64k x 152k) is reported as an error row; the run goes on.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from kernels.bench import packing
from kernels.bench.head import PROVIDERS, matmul_peak_tflops

CPU_DEFAULTS = dict(tokens="4096", vocab="32768", hidden="1024", dtype="float32")
CUDA_DEFAULTS = dict(tokens="4096,16384,65536", vocab="32768,151936", hidden="2048,4096", dtype="bfloat16")
CPU_PROVIDERS = ("naive", "reference", "chunk_recompute", "fused_torch")
CUDA_PROVIDERS = ("naive", "compiled_chunk", "fused_torch", "triton")


def available_providers(on_gpu):
    have = list(CUDA_PROVIDERS if on_gpu else CPU_PROVIDERS)
    if importlib.util.find_spec("liger_kernel") is not None:
        have.append("liger")
    else:
        print("note: liger skipped (liger_kernel is not installed: pip install liger-kernel)")
    return have


def run_provider(provider, T, V, H, args):
    cmd = [sys.executable, "-m", "kernels.bench.head", "--provider", provider, "--tokens", str(T),
           "--vocab", str(V), "--hidden", str(H), "--dtype", args.dtype, "--reps", str(args.reps),
           "--warmup", str(args.warmup)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(provider=provider, T=T, V=V, H=H, error=f"timed out after {args.timeout} s")
    if done.returncode != 0:
        return dict(provider=provider, T=T, V=V, H=H, error=done.stderr.strip().splitlines()[-1:] or ["failed"])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["process_s"] = time.perf_counter() - start
    return record


def run_rounds(providers, T, V, H, args):
    """Each round runs every provider once, in turn, so that on a shared machine all providers see
    the same background load; per provider the round with the least CPU time is kept."""
    runs = {provider: [] for provider in providers}
    for round_ in range(args.rounds):
        for provider in providers:
            record = run_provider(provider, T, V, H, args)
            runs[provider].append(record)
            print(f"  round {round_ + 1} {provider} T={T} V={V} H={H}: " + ("error" if "error" in record else
                  f"{record['full_s']:.3f} s, cpu {record['full_cpu_s']:.3f} s"), flush=True)
    kept = []
    for provider in providers:
        ok = [r for r in runs[provider] if "error" not in r]
        best = dict(min(ok, key=lambda r: r["full_cpu_s"]) if ok else runs[provider][-1])
        best["rounds"] = [{k: r[k] for k in ("full_s", "full_cpu_s", "peak_extra_mib", "error") if k in r}
                          for r in runs[provider]]
        kept.append(best)
    return kept


def format_head_table(records, peak_tflops=None):
    """One row per (shape, provider); ratios to naive at the same shape. With `peak_tflops` (the
    measured bf16 matmul rate, CUDA) it adds TFLOP/s on 6*T*H*V and the share of that rate."""
    head = (f"{'provider':<16} {'T':>5} {'V':>6} {'H':>5} {'fwd s':>7} {'bwd s':>7} {'full s':>7} {'cpu s':>7} "
            f"{'cpu/naive':>9} {'wall/naive':>10} {'extra MiB':>9} {'mem/naive':>9}")
    if peak_tflops:
        head += f" {'TFLOP/s':>8} {'of bf16 mm':>10}"
    rows = [head, "-" * len(head)]
    for r in records:
        H = r.get("H", "")
        if "error" in r:
            rows.append(f"{r['provider']:<16} {r['T']:>5} {r['V']:>6} {H:>5}  error: {r['error']}")
            continue
        naive = next((n for n in records if n["provider"] == "naive" and (n["T"], n["V"], n.get("H")) == (r["T"], r["V"], H)
                      and "error" not in n), None)
        ratio = lambda key: f"{r[key] / naive[key]:.2f}x" if naive and naive[key] > 0 else "-"  # noqa: E731
        line = (f"{r['provider']:<16} {r['T']:>5} {r['V']:>6} {H:>5} {r['forward_s']:7.3f} {r['backward_s']:7.3f} "
                f"{r['full_s']:7.3f} {r['full_cpu_s']:7.3f} {ratio('full_cpu_s'):>9} {ratio('full_s'):>10} "
                f"{r['peak_extra_mib']:9.0f} {ratio('peak_extra_mib'):>9}")
        if peak_tflops:
            line += f" {r['tflops']:8.1f} {r['tflops'] / peak_tflops:10.1%}"
        rows.append(line)
    tuned = [r for r in records if r.get("tuned")]
    if tuned:
        rows.append("\nTriton configs chosen by autotune:")
        for r in tuned:
            rows.append(f"  T={r['T']} V={r['V']} H={r.get('H')}: " +
                        "; ".join(f"{kernel} {config}" for kernel, config in r["tuned"].items()))
    return "\n".join(rows)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["all", "head", "packing"], default="all")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (sweep; default: see above)")
    p.add_argument("--vocab", default=None, help="comma-separated vocabulary sizes per TP rank (sweep)")
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes (sweep)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate all providers this many times, keep the best")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per provider process")
    p.add_argument("--pack-samples", type=int, default=4096)
    p.add_argument("--pack-budget", type=int, default=16384)
    p.add_argument("--pack-dp", type=int, default=8)
    p.add_argument("--json", default="runs/bench/kernels.json", help="where to write the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    for key, value in (CUDA_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "args": vars(args)}
    if args.suite in ("all", "head"):
        providers = args.providers.split(",") if args.providers else available_providers(on_gpu)
        if "naive" not in providers:
            print("note: no 'naive' provider, so no ratios")
        peak = None
        if on_gpu:
            peak = out["bf16_matmul_tflops"] = matmul_peak_tflops(torch.bfloat16)
            print(f"bf16 matmul (8192^3, cuBLAS): {peak:.0f} TFLOP/s")
        records = []
        for T in map(int, args.tokens.split(",")):
            for V in map(int, args.vocab.split(",")):
                for H in map(int, args.hidden.split(",")):
                    records += run_rounds(providers, T, V, H, args)
        print(f"\nLM head + PPO-clip/k3 loss, forward + backward, {args.dtype}, device {out['device']}, "
              f"best of {args.rounds} round(s) x {args.reps} repetitions by CPU time")
        print(format_head_table(records, peak))
        out["head"] = records
    if args.suite in ("all", "packing"):
        results = packing.run(samples=args.pack_samples, token_budget=args.pack_budget, dp_size=args.pack_dp)
        print(f"\nPacking: {args.pack_samples} lognormal samples (mean 800, max 8192), budget {args.pack_budget} "
              f"tokens, DP={args.pack_dp}")
        print(packing.format_table(results))
        out["packing"] = results
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
