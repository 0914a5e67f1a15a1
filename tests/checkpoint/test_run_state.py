"""Run checkpoints (checkpoint/run_state.py): exact continuation, resume on another layout, and the
directory mechanics (verification, fallback, pruning, `latest` written last)."""
import json
import os
import random

import numpy as np
import pytest
import torch

from megatron_vlm.checkpoint import run_state as rs
from megatron_vlm.checkpoint.run_state import (CheckpointError, capture_rng,
                                               find_checkpoint, full_state, restore_rng,
                                               verify_checkpoint)
from megatron_vlm.checkpoint.sharding import RankLayout, merge_shards, shard_tensor
from megatron_vlm.config import CheckpointConfig
from megatron_vlm.parallel.config import ParallelConfig
from tests.utils import assert_close, run_worker

WORKER = os.path.join(os.path.dirname(__file__), "run_state_worker.py")


# -- unit tests (one process) ---------------------------------------------------------------------
def test_config_is_validated_naming_the_field():
    assert CheckpointConfig() == CheckpointConfig(every=None, keep=2)
    with pytest.raises(ValueError, match="train.checkpoint.every must be >= 1 or null, got 0"):
        CheckpointConfig(every=0)
    with pytest.raises(ValueError, match="train.checkpoint.keep must be >= 1, got 0"):
        CheckpointConfig(keep=0)


def test_rng_round_trip_through_a_weights_only_file(single_rank_runtime, tmp_path):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(2)
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(2), tracked

    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(capture_rng(), tmp_path / "rng.pt")
    first = draws()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = draws()
    for a, b in zip(first, second):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("gated", [False, True])
def test_merge_shards_inverts_shard_tensor(gated):
    name = "decoder.layers.0.mlp.linear_fc1.weight" if gated else "decoder.layers.0.mlp.linear_fc2.weight"
    dim = 0 if gated else 1
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    layouts = [RankLayout(tp_rank=r, tp_size=2, etp_rank=0, etp_size=1, ep_rank=0, ep_size=1,
                          layer_offset=0, num_local_experts=1) for r in range(2)]
    pieces = [shard_tensor(full, name, dim, layout) for layout in layouts]
    assert torch.equal(merge_shards(pieces, dim, gated), full)


@pytest.fixture
def run(single_rank_runtime):
    """The worker's tiny MoE LM at one rank with the distributed optimizer, stepped once."""
    from tests.checkpoint import run_state_worker as w

    built = w.build(ParallelConfig(), True, torch.float32, seed=3)
    w.steps(built, 1, 1)
    return built


def save(root, tag, run, keep=2):
    from tests.checkpoint import run_state_worker as w

    return w.save(root, tag, run, step=int(tag.split("-")[-1]), keep=keep)


def test_keep_prunes_to_the_newest_and_removes_stale_tmp_dirs(run, tmp_path):
    (tmp_path / "step-0.tmp-deadbeef").mkdir(parents=True)  # a crashed save
    for step in (1, 2, 3):
        path = save(tmp_path, f"step-{step}", run)
        assert rs.read_latest(tmp_path) == f"step-{step}"
        assert path == tmp_path / f"step-{step}" and (path / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2", "step-3"]
    save(tmp_path, "step-4", run, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-4"]


def test_the_file_format(run, tmp_path):
    path = save(tmp_path, "step-1", run)
    manifest = verify_checkpoint(path)
    assert manifest["world_size"] == 1 and manifest["layout"]["tp"] == 1
    assert set(manifest["files"]) == {
        "config.json", "optimizer.pt", "run_state.pt", "scheduler.json", "rank/rank00000.pt",
        "optim/rank00000.safetensors", "model/policy-rank00000.safetensors",
        "model/reference-rank00000.safetensors"}
    for name in ("optimizer.pt", "run_state.pt", "rank/rank00000.pt"):
        torch.load(path / name, weights_only=True)
    assert json.loads((path / "scheduler.json").read_text())["num_steps"] == 1
    policy = full_state(path)
    model = run[0]
    assert policy.keys() == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert torch.equal(policy[name], param)
    optim = full_state(path, "optim")
    assert {k.split("/")[0] for k in optim} == {"exp_avg", "exp_avg_sq", "step"}  # fp32: no "main"
    assert all(float(v) == 1 for k, v in optim.items() if k.startswith("step/"))


@pytest.fixture
def two_saved(run, tmp_path):
    root = tmp_path / "checkpoints"
    save(root, "step-1", run)
    save(root, "step-2", run)
    return root


def corrupt(path, how):
    if how == "missing":
        path.unlink()
    elif how == "size":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:  # same size, one byte changed
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, file, message", [
    ("missing", "model/policy-rank00000.safetensors",
     "step-2: model/policy-rank00000.safetensors missing \\(rank0 policy model file\\)"),
    ("missing", "optim/rank00000.safetensors", "missing \\(rank0 optimizer file\\)"),
    ("size", "optim/rank00000.safetensors",
     "step-2: optim/rank00000.safetensors size mismatch \\(manifest \\d+ bytes, file \\d+\\)"),
    ("sha", "model/reference-rank00000.safetensors",
     "step-2: model/reference-rank00000.safetensors sha256 mismatch"),
    ("sha", "scheduler.json", "step-2: scheduler.json sha256 mismatch"),
])
def test_verification_names_the_file_and_auto_falls_back(two_saved, how, file, message):
    corrupt(two_saved / "step-2" / file, how)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(two_saved / "step-2")
    with pytest.raises(CheckpointError, match=message):  # a given path must verify
        find_checkpoint(two_saved, str(two_saved / "step-2"))
    rejected = []
    assert find_checkpoint(two_saved, "auto", log=rejected.append) == two_saved / "step-1"
    assert len(rejected) == 1 and "step-2" in rejected[0] and file in rejected[0]


@pytest.mark.parametrize("text, message", [
    ("{not json", "manifest.json: does not parse"),
    (json.dumps({"format": 1, "files": {}}), "manifest.json: no 'world_size' entry"),
    (json.dumps({"format": 1, "world_size": 2, "layout": {}, "files": {"rank/rank00000.pt": {}},
                 "tensors": {}}), "lists no rank/rank00001.pt though world_size is 2"),
])
def test_a_bad_manifest_is_named(two_saved, text, message):
    (two_saved / "step-2" / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(two_saved / "step-2")
    assert find_checkpoint(two_saved, "auto", log=lambda m: None) == two_saved / "step-1"


def test_find_checkpoint_without_any_and_with_none_valid(two_saved, tmp_path):
    assert find_checkpoint(tmp_path / "nothing", "auto") is None
    (tmp_path / "empty").mkdir()
    assert find_checkpoint(tmp_path / "empty", "auto") is None
    for tag in ("step-1", "step-2"):
        (two_saved / tag / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies: .*step-2/manifest.json"):
        find_checkpoint(two_saved, "auto", log=lambda m: None)


@pytest.mark.parametrize("crash_in", ["_publish", "_write_latest"])
def test_latest_is_written_last_so_a_crashed_save_is_never_chosen(two_saved, run, monkeypatch, crash_in):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rs, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        save(two_saved, "step-3", run)
    left = {p.name for p in two_saved.iterdir()}
    # crash before the rename: a tmp dir; after it: a complete step-3 that `latest` does not name
    assert (any(".tmp-" in n for n in left) if crash_in == "_publish" else "step-3" in left)
    assert rs.read_latest(two_saved) == "step-2"
    assert find_checkpoint(two_saved, "auto") == two_saved / "step-2"
    monkeypatch.undo()
    save(two_saved, "step-4", run)  # the next save clears what the crash left, keeps 2
    newest = "step-2" if crash_in == "_publish" else "step-3"  # step-3 complete, just unnamed
    assert sorted(p.name for p in two_saved.iterdir()) == ["latest", newest, "step-4"]


def test_a_missing_model_is_named_on_load(two_saved, run):
    _, ddp, optimizer, scheduler, reference = run
    with pytest.raises(CheckpointError, match="no 'critic' model saved"):
        rs.load_checkpoint(two_saved / "step-2", model_chunks=[ddp], optimizer=optimizer,
                           scheduler=scheduler, extra_models={"critic": [reference]})


def test_an_optional_model_the_checkpoint_lacks_is_listed_not_required(two_saved, run):
    _, ddp, optimizer, scheduler, reference = run
    extra = {"critic": [reference], "reference": [reference]}
    run_state, _ = rs.load_checkpoint(two_saved / "step-2", model_chunks=[ddp], optimizer=optimizer,
                                      scheduler=scheduler, extra_models=extra, optional_models=frozenset(extra))
    assert run_state["models_not_saved"] == ["critic"]  # the reference was saved, so it loaded


def test_load_checks_the_sha256_of_what_it_reads(two_saved, run):
    _, ddp, optimizer, scheduler, reference = run
    corrupt(two_saved / "step-2" / "model" / "reference-rank00000.safetensors", "sha")
    message = "step-2: model/reference-rank00000.safetensors sha256 mismatch"
    with pytest.raises(CheckpointError, match=message):
        rs.load_checkpoint(two_saved / "step-2", model_chunks=[ddp], optimizer=optimizer,
                           scheduler=scheduler, extra_models={"reference": [reference]})


def test_a_failed_write_raises_and_leaves_latest(two_saved, run, monkeypatch):
    write = rs._write_bytes

    def disk_full(path, data):
        if "optim" in str(path):
            raise OSError(28, "No space left on device")
        return write(path, data)

    monkeypatch.setattr(rs, "_write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(two_saved, "step-3", run)
    assert rs.read_latest(two_saved) == "step-2" and not (two_saved / "step-3").exists()


# -- multi-rank: exact continuation and a layout change ------------------------------------------
@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Three launches: TP2 x EP2 on 4 ranks saves; EP=2 on 2 ranks trains and saves every case;
    fresh EP=2 processes resume every case and load the 4-rank checkpoint at TP1 x EP2."""
    root = tmp_path_factory.mktemp("run_state")
    layout_a = run_worker(WORKER, root, nproc=4, args=("layout_a", str(root)))
    train = run_worker(WORKER, root, nproc=2, args=("train", str(root)))
    resumed = run_worker(WORKER, root, nproc=2, args=("resume", str(root)))
    return root, layout_a, train, resumed


@pytest.mark.dist
def test_resume_continues_bit_identically(launches):
    from tests.checkpoint.run_state_worker import CASES

    _, _, train, resumed = launches
    for case in CASES:
        before, after = train[case], resumed["resume"][case]
        assert after["losses"] == before["losses"], case        # steps 3 and 4, exactly
        assert after["draws"] == before["draws"], case          # python, numpy, torch, tracker
        assert after["mismatched_tensors"] == 0, (case, after["mismatch_examples"])  # params, ref, lr
        assert after["run_state_step"] == 2 and after["run_state_seen"] == [0, 1, 2], case
        assert after["rank_state_ok"], case


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["b", "c"])  # TP2 x EP2 (4 ranks) -> TP1 x EP2, PP2 x EP1 (2)
def test_resume_on_another_layout(launches, layout):
    root, layout_a, _, resumed = launches
    report, ckpts = resumed[f"layout_{layout}"], root / "layout"
    assert report["rank_state_is_none"] and report["run_state_step"] == 2
    # Loaded at the new layout and saved again at once: every tensor as the TP2 x EP2 run saved it.
    for group in ("model/policy", "model/reference", "optim"):
        saved, reloaded = full_state(ckpts / "saved", group), full_state(ckpts / f"reloaded_{layout}", group)
        assert saved.keys() == reloaded.keys(), group
        for key in saved:
            assert torch.equal(saved[key], reloaded[key]), (group, key)
    # The next step at the new layout: TP splits the matmuls' sums differently, so gradients agree
    # to fp32 reduction order (~1e-7 relative); the loss to rtol 1e-5, and Adam's normalised update
    # moves the weights to within an ulp or two of the old layout's (lr 1e-2).
    assert report["step3_loss"] == pytest.approx(layout_a["step3_loss"], rel=1e-5)
    a, b = full_state(ckpts / "after_a"), full_state(ckpts / f"after_{layout}")
    for key in a:
        assert_close(b[key], a[key], atol=2e-7, rtol=1e-6, name=key)
