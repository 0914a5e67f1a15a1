"""DP-split scoring (issue #11 item 9): score_rows runs each DP rank on its own share of the rows
(dealt by token cost) and all-gathers the shares (dp_score_worker.py): on two gloo ranks at DP=2
and at EP=2 x DP=2, on four at PP=2 x DP=2 and TP=2 x DP=2, the result equals every rank scoring
every row, on every rank, and every rank (the expert group's included) runs the same number of
forwards."""
import json
import os

import pytest

from megatron_vlm.parallel.launch import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "dp_score_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_dp_split_scoring_equals_unsplit(nproc, tmp_path):
    out = tmp_path / "dp_score.json"
    result = launch_local([WORKER, str(out)], nproc=nproc, timeout=400, env={"PYTHONPATH": ROOT})
    assert result.ok, result.summary()
    report = json.loads(out.read_text())
    print(json.dumps(report))
    rows = len(report.pop("row_lengths"))
    assert len(report) == 4
    for case, r in report.items():
        # bound: the same rows in other packs (other matmul shapes) may differ in fp32's last bits
        assert r["max_abs_split_vs_unsplit"] < 1e-5, case
        assert r["max_abs_across_ranks"] == 0.0, case       # every rank holds the same gathered tensor
        assert sum(s["rows"] for s in r["shares"]) == rows, case
        assert all(s["rows"] > 0 for s in r["shares"]), case  # neither rank scores everything
        packs = {s["packs"] for s in r["shares"]}
        assert len(packs) == 1, case                         # as many micro-batches on every rank...
        assert r["split_forwards_per_rank"] == [packs.pop()] * nproc, case  # ...and as many forwards
