"""Every parallel layout gives the unsharded model's logits, loss, gradients and updated parameters.

Two launches (2 and 4 gloo ranks) each check several layouts; see equivalence_worker.py for what is
compared. Tolerances: fp32 with a different reduction order across ranks (TP splits matmuls and
all-reduces partial sums, CP splits softmax denominators), so logits and gradients may differ by a
few ulps of their magnitude (~1e-7 relative); the loss is reduced the same way and comes out equal.
After one Adam step the parameter error is lr * dg / (|g| + eps) <= 1e-2 * 4e-8 / 1e-3 = 4e-7 (eps is
set to 1e-3 in the worker so that near-zero gradients do not amplify ulp differences into an O(lr)
step).
"""
import json
import os

import pytest

from megatron_vlm.parallel.launch import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "equivalence_worker.py")
LAUNCHES = {
    2: ["tp2_sp", "ep2_alltoall", "ep2_allgather", "pp2_1f1b", "cp2", "pp2_tied"],
    4: ["tp2_ep2", "pp2_tp2", "cp2_tp2", "ep2_etp2_alltoall", "dp4"],
}
TOLERANCE = {"logits_max_abs": 1e-6, "loss_abs_diff": 1e-6, "grad_max_abs": 1e-6,
             "grad_rel_err": 2e-6, "param_ddp_max_abs": 1e-6, "param_distopt_max_abs": 1e-6,
             "param_count_mismatch": 0}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for nproc, layouts in LAUNCHES.items():
        path = tmp_path_factory.mktemp("eq") / f"world{nproc}.json"
        result = launch_local([WORKER, str(path), ",".join(layouts)], nproc=nproc, timeout=420)
        assert result.ok, result.summary()
        out.update(json.loads(path.read_text()))
    return out


@pytest.mark.dist
@pytest.mark.parametrize("layout", [name for names in LAUNCHES.values() for name in names])
def test_layout_matches_unsharded(reports, layout):
    report = reports[layout]
    print(layout, json.dumps(report))
    assert set(TOLERANCE) <= set(report)
    for key, bound in TOLERANCE.items():
        assert report[key] <= bound, f"{layout}: {key} = {report[key]:.3g} > {bound}"
