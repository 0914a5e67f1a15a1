"""Compile the head kernels for a GPU target without a GPU: what each autotune config becomes.

    python -m kernels.bench.compile [--arch 90] [--dtype bfloat16] [--json out.json]

For every config in kernels.logprobs.GPU_CONFIGS and both head kernels, `triton.compile` builds the
kernel for sm_<arch> with the specialisation the JIT gives at run time (16-byte aligned pointers,
H and V divisible by 16), and the bundled ptxas reports registers and spills. Printed per config:
the MMA instruction used (wgmma on Hopper), whether loads are pipelined (cp.async), shared memory,
registers, spill bytes. This is how the config set was chosen on a machine with no GPU; it says
nothing about speed. Needs TRITON_INTERPRET unset (interpreted kernels are not compiled).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
RUN_DTYPE_POINTERS = ("h_ptr", "w_ptr", "dz_ptr")  # the rest: labels int64, statistics fp32
INT_ARGS = ("T", "V", "H", "vocab_start")


def _signature(fn, run_dtype, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{run_dtype}" if name in RUN_DTYPE_POINTERS else ("*i64" if name == "labels_ptr" else "*fp32")
        else:
            signature[name] = "i32" if name in INT_ARGS else "fp32"
    return signature


def compile_config(kernel, config, dtype, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.logprobs as lp
    fn = kernel.fn
    fixed = dict(NEED_ENTROPY=True, SPLIT_COLUMNS=lp.SPLIT_COLUMNS, HAS_G_ENT=True, GROUP_T=lp.GROUP_T,
                 DOT_PRECISION="ieee" if dtype == "float32" else "tf32")
    constexprs = {k: v for k, v in fixed.items() if k in fn.arg_names} | config.kwargs
    signature = _signature(fn, DTYPES[dtype], constexprs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in ("H", "V")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = compiled.asm["ptx"]
    record = dict(kernel=fn.__name__, dtype=dtype, **config.kwargs, num_warps=config.num_warps,
                  num_stages=config.num_stages, shared_bytes=compiled.metadata.shared,
                  mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none (FMA)",
                  pipelined="cp.async" in ptx)
    record.update(_ptxas_report(ptx, arch))
    return record


def _ptxas_report(ptx, arch):
    """Registers and spill bytes from the bundled ptxas (the newest one, for the PTX version)."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, n))), None)
    if ptxas is None:
        return dict(registers=None, spill_bytes=None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) if spills else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--configs", type=int, default=None, help="only the first N configs (a quick check)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels.bench.compile: unset TRITON_INTERPRET (interpreted kernels are not compiled)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    import kernels.logprobs as lp
    records = [compile_config(kernel, config, a.dtype, a.arch)
               for kernel in (lp._fwd_kernel, lp._dlogits_kernel) for config in lp.GPU_CONFIGS[:a.configs]]
    for r in records:
        print(f"{r['kernel']:<16} {r['dtype']} T{r['BLOCK_T']:>3} V{r['BLOCK_V']:>3} H{r['BLOCK_H']:>2} "
              f"w{r['num_warps']} s{r['num_stages']}: {r['mma']}, pipelined {r['pipelined']}, "
              f"shared {r['shared_bytes'] // 1024} KiB, {r['registers']} registers, {r['spill_bytes']} B spilled")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
