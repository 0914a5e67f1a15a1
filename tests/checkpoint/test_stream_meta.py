"""The weight stream's metadata (issue #11 item 9): at PP > 1 a receiving stage allocates each
tensor from one shape table shared per stream (a single all_gather_object over PP) instead of one
broadcast_object_list per tensor; the buckets stay what the PP=1 stream yields, name for name and
bit for bit (stream_meta_worker.py, 2 gloo ranks)."""
import pytest

from tests.utils import run_worker


@pytest.mark.dist
def test_stream_shares_metadata_once_and_keeps_the_buckets(tmp_path):
    report = run_worker("tests/checkpoint/stream_meta_worker.py", tmp_path, nproc=2, timeout=300)
    assert report["all_ranks_agree"] and report["buckets"] > 1
    for layout in ("pp1", "pp2", "ep2"):
        assert report[layout]["same_bucket_names"] and report[layout]["same_tensors"], layout
    assert report["pp2"]["object_collectives"] == 1     # was one per tensor (report["tensors"])
    assert report["pp1"]["object_collectives"] == report["ep2"]["object_collectives"] == 0
