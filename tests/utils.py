"""Shared test helpers."""
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """torch.testing-style closeness check whose failure message is useful for numerics.

    On failure it says how many elements differ, where the first ones are (with both values), the
    largest absolute and relative error, and whether NaN/inf appear in one tensor but not the other.
    Both tensors are compared in float64 so a bf16 result can be checked against an fp32 reference.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    problems = []
    for label, check in (("NaN", torch.isnan), ("inf", torch.isinf)):
        mismatch = check(a) != check(e)
        if mismatch.any():
            first = [tuple(i) for i in mismatch.nonzero()[:5].tolist()]
            problems.append(f"{label} mismatch at {int(mismatch.sum())} elements, first {first}")
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    err = (a - e).abs()
    bad = both_finite & (err > atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        firsts = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        finite_err = torch.where(both_finite, err, torch.zeros_like(err))
        rel = finite_err / e.abs().clamp_min(1e-30)
        problems.append(
            f"{int(bad.sum())} of {a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"first {firsts}; max abs err {finite_err.max().item():.3g}, max rel err {rel.max().item():.3g}"
        )
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))


def run_worker(worker: str, out_dir, nproc: int = 2, timeout: int = 400, args: tuple = ()) -> dict:
    """Launch `worker OUT.json *args` on `nproc` local gloo ranks and return the JSON its rank 0
    wrote (printed too, so `pytest -s` shows the measured figures)."""
    import json
    import os
    from pathlib import Path

    from megatron_vlm.parallel.launch import launch_local

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = Path(out_dir) / (Path(worker).stem + ".json")
    result = launch_local([worker, str(out), *args], nproc=nproc, timeout=timeout, env={"PYTHONPATH": root})
    assert result.ok, result.summary()
    report = json.loads(out.read_text())
    print(json.dumps(report))
    return report
