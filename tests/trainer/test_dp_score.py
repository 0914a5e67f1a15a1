"""DP-split scoring (issue #11 item 9): score_rows runs each DP rank on its own share of the rows
(dealt by token cost) and all-gathers the shares (dp_score_worker.py): on two gloo ranks at DP=2
and at EP=2 x DP=2, on four at PP=2 x DP=2 and TP=2 x DP=2, the result equals every rank scoring
every row, on every rank, and every rank (the expert group's included) runs the same number of
forwards."""
import pytest

from tests.utils import run_worker


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_dp_split_scoring_equals_unsplit(nproc, tmp_path):
    report = run_worker("tests/trainer/dp_score_worker.py", tmp_path, nproc=nproc, timeout=400)
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
