"""The Triton kernels against the torch reference on the GPU: tests/kernels' own comparisons, rerun
with device tensors (the kernels_fp32 / kernels_bf16 stages of launch/gpu_smoke.sh).

    python launch/gpu_smoke_kernels.py --dtype float32|bfloat16 [--device cuda]

The tests build their inputs on the host, where Triton runs under TRITON_INTERPRET=1, so on a GPU
`pytest tests/kernels` would hand host pointers to real Triton launches. Here each test module's
input builders are rebound to return device tensors, and the tests whose every tensor comes from
those builders are called unchanged with impl="triton": same shapes (one regular, one awkward),
same reference, same tolerances and failure messages. A tensor left on the host fails the Triton
launch, so a pass means the kernels ran on the device. Packing, whose tests build tensors inline,
is checked here the same way (exact equality with kernels.reference).

`--device cpu` (with TRITON_INTERPRET=1) runs the same calls on the CPU: how the CPU suite checks
this script's wiring. Prints one line per check and a JSON summary last; exit 1 if one failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: kernels/ and tests/

import torch  # noqa: E402


def on_device(module, names: list[str], device: torch.device) -> None:
    """Rebind module.NAME (input builders) so that every tensor they return is on `device`."""
    for name in names:
        build = getattr(module, name)
        setattr(module, name, lambda *a, _build=build, **k: tuple(
            t.to(device) if torch.is_tensor(t) else t for t in _build(*a, **k)))


def checks(dtype: torch.dtype, device: torch.device) -> list[tuple[str, callable]]:
    from tests.kernels import test_logprobs as logprobs
    from tests.kernels import test_policy_loss as policy_loss

    on_device(logprobs, ["_inputs"], device)
    on_device(policy_loss, ["_head_inputs"], device)
    fused_shapes = [(T, V, H, cu.to(device)) for T, V, H, cu in policy_loss.FUSED_SHAPES]
    policy_loss.FUSED_SHAPES = fused_shapes  # test_fused_bf16_against_fp32_reference reads it
    out = []
    if dtype == torch.float32:
        for T, V, H in logprobs.SHAPES:
            for temperature in (1.0, 0.7):
                out.append((f"logprobs fp32 T={T} V={V} H={H} t={temperature}", lambda a=(T, V, H, temperature):
                            logprobs.test_fp32_matches_reference("triton", *a)))
        out.append(("logprobs never positive (one dominant logit)",
                    lambda: logprobs.test_logprobs_never_positive_even_when_one_logit_dominates("triton")))
        for T, V, H, cu in fused_shapes:
            for variant in ("dapo_k3", "dual_clip_k1", "gspo_k3"):
                out.append((f"fused policy loss fp32 {variant} T={T} V={V}", lambda a=(T, V, H, cu, variant):
                            policy_loss.test_fused_fp32_matches_reference("triton", *a)))
        packing_dtypes = (torch.int64, torch.float32)
    else:
        for T, V, H in logprobs.SHAPES:
            out.append((f"logprobs bf16 vs fp32 reference T={T} V={V} H={H}", lambda a=(T, V, H):
                        logprobs.test_bf16_against_fp32_reference("triton", *a)))
        out.append(("fused policy loss bf16 vs fp32 reference",
                    lambda: policy_loss.test_fused_bf16_against_fp32_reference("triton")))
        packing_dtypes = (torch.bfloat16,)
    out += chunked_backward_checks(dtype)
    for packing_dtype in packing_dtypes:
        out.append((f"pack / unpack {str(packing_dtype).replace('torch.', '')}",
                    lambda d=packing_dtype: pack_round_trip(d, device)))
    return out


def chunked_backward_checks(dtype: torch.dtype) -> list[tuple[str, callable]]:
    """tests/kernels/test_triton_head.py's several-chunk backward (forced small chunks: the path a
    long pack takes; in bf16 the fp32 d weight accumulator across chunks). That module builds its
    inputs on the GPU itself when not interpreted; its monkeypatch fixture becomes a context here."""
    import pytest

    from tests.kernels import test_triton_head as head

    def patched(test, *args):
        with pytest.MonkeyPatch.context() as monkeypatch:
            test(*args, monkeypatch)

    if dtype == torch.float32:
        return [(f"chunked head backward fp32 T={T} V={V} H={H}", lambda a=(T, V, H): patched(
                 head.test_several_backward_chunks_and_forward_splits_match_the_reference_fp32, *a))
                for T, V, H in head.SHAPES]
    return [("chunked head backward bf16, fp32 d weight accumulation",
             lambda: patched(head.test_several_backward_chunks_bf16_accumulate_d_weight_in_fp32))]


def pack_round_trip(dtype: torch.dtype, device: torch.device) -> None:
    """As tests/kernels/test_packing.py's round trip: exact, an empty and a one-token sample."""
    from kernels.packing import cu_seqlens_from_lengths, pack, unpack
    from kernels.reference import pack_ref, unpack_ref

    lengths = torch.tensor([5, 1, 17, 33, 0, 8])
    padded = (torch.randn(len(lengths), 40, 300) * 100).to(dtype)  # 300 columns: > one column block
    cu, _ = cu_seqlens_from_lengths(lengths)
    packed = pack(padded.to(device), cu.to(device), impl="triton")
    assert packed.device.type == device.type
    assert torch.equal(packed.cpu(), pack_ref(padded, lengths)), "pack differs from pack_ref"
    restored = unpack(packed, cu.to(device), 40, impl="triton")
    assert torch.equal(restored.cpu(), unpack_ref(packed.cpu(), cu, 40)), "unpack differs from unpack_ref"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the Triton kernels need one (--device cpu with TRITON_INTERPRET=1 "
                         "runs the same checks interpreted)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 in the environment")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreted)"
    passed, failed = 0, []
    for label, check in checks(getattr(torch, args.dtype), device):
        start = time.perf_counter()
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the rest still run
            failed.append(label)
            print(f"FAIL {label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", flush=True)
            continue
        passed += 1
        print(f"ok   {label} ({time.perf_counter() - start:.2f} s)", flush=True)
    print(json.dumps({"dtype": args.dtype, "device": name, "passed": passed, "failed": len(failed),
                      "failures": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
