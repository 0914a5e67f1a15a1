"""HF <-> megatron conversion: lossless round trip, loadable export, and clear errors on bad input."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_vlm.checkpoint import convert
from megatron_vlm.checkpoint.hf_io import HFCheckpointReader, ShardedWriter
from megatron_vlm.cli import main as cli
from megatron_vlm.parallel.config import ParallelConfig
from tests.models.vlm_fixtures import make_hf_model, make_inputs

HUB_FUSED = ("experts.gate_up_proj", "experts.down_proj")


def write_hub_checkpoint(hf, out: Path, max_shard_bytes=150_000, hub_layout=True):
    """An HF dir as the Hub has it: fused experts transposed, several shards, a tokenizer file."""
    writer = ShardedWriter(out, max_shard_bytes)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue  # transformers does not save the tied copy either
        if hub_layout and name.endswith(HUB_FUSED):
            tensor = tensor.transpose(1, 2).contiguous()
        writer.add(name, tensor)
    path = writer.finish(config_json=hf.config.to_dict())
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def all_tensors(directory: Path) -> dict:
    reader = HFCheckpointReader(directory)
    return {k: reader.get(k) for k in reader.keys()}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    hf = make_hf_model("qwen3_vl_moe")
    root = tmp_path_factory.mktemp("convert")
    return hf, write_hub_checkpoint(hf, root / "hub"), root


def test_round_trip_is_bit_identical_and_loads_in_transformers(moe):
    hf, hub, root = moe
    assert cli(["convert", "hf-to-mcore", "--hf", str(hub), "--out", str(root / "mc"),
                "--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1"]) == 0
    assert cli(["convert", "mcore-to-hf", "--ckpt", str(root / "mc"), "--out", str(root / "back"),
                "--max-shard-gb", "0.0002"]) == 0
    source, back = all_tensors(hub), all_tensors(root / "back")
    assert source.keys() == back.keys()
    for name in source:
        assert source[name].shape == back[name].shape and torch.equal(source[name], back[name]), name
    assert back["model.language_model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 64, 96)  # Hub layout
    index = json.loads((root / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # bounded shards
    assert (root / "back" / "chat_template.jinja").is_file() and (root / "back" / "tokenizer_config.json").is_file()
    reloaded = type(hf).from_pretrained(str(root / "back")).eval()
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, hf(**inputs).logits)


def test_multi_process_conversion_writes_the_same_files(moe):
    hf, hub, root = moe
    args = ["convert", "hf-to-mcore", "--hf", str(hub), "--tp", "2", "--ep", "2", "--etp", "1"]
    assert cli(args + ["--out", str(root / "one")]) == 0
    assert cli(args + ["--out", str(root / "two"), "--nproc", "2"]) == 0
    files = sorted(p.name for p in (root / "one").glob("*.safetensors"))
    assert files == sorted(p.name for p in (root / "two").glob("*.safetensors")) and len(files) == 4
    for name in files:
        with safe_open(str(root / "one" / name), "pt") as a, safe_open(str(root / "two" / name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_transformers_own_save_layout_is_read_too(tmp_path):
    hf = make_hf_model("qwen3_vl_moe", seed=4)
    src = write_hub_checkpoint(hf, tmp_path / "plain", hub_layout=False)
    convert.hf_to_mcore(str(src), str(tmp_path / "mc"), ParallelConfig(ep=2, etp=1))
    convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"))
    back = all_tensors(tmp_path / "back")
    fused = "model.language_model.layers.2.mlp.experts.down_proj"
    assert torch.equal(back[fused], hf.state_dict()[fused].transpose(1, 2))


def test_dense_family_with_tied_embeddings_and_pp(tmp_path):
    hf = make_hf_model("qwen3_vl", tie=True)
    src = write_hub_checkpoint(hf, tmp_path / "hub")
    convert.hf_to_mcore(str(src), str(tmp_path / "mc"), ParallelConfig(tp=2, pp=2))
    with safe_open(str(tmp_path / "mc" / "dense-pp1-tp1.safetensors"), "pt") as f:
        embed = hf.state_dict()["model.language_model.embed_tokens.weight"]
        assert torch.equal(f.get_tensor("language.output_layer.weight"), embed.chunk(2)[1])
    convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"))
    source, back = all_tensors(src), all_tensors(tmp_path / "back")
    assert source.keys() == back.keys() and all(torch.equal(source[k], back[k]) for k in source)


# --- bad input -----------------------------------------------------------------------------------
def test_unknown_architecture(moe, tmp_path):
    _, hub, _ = moe
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hub.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MllamaForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'MllamaForConditionalGeneration'; "
                                         "supported: Qwen2_5_VL"):
        convert.hf_to_mcore(str(bad), str(tmp_path / "out"), ParallelConfig())


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_truncated_shards_are_named(moe, tmp_path):
    _, hub, _ = moe
    shards = sorted(p.name for p in hub.glob("model-*.safetensors"))
    missing = copy_dir(hub, tmp_path / "missing")
    (missing / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[1]}: shard listed"):
        convert.hf_to_mcore(str(missing), str(tmp_path / "o1"), ParallelConfig())
    truncated = copy_dir(hub, tmp_path / "truncated")
    shard = truncated / shards[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shards[2]}: unreadable or truncated"):
        convert.hf_to_mcore(str(truncated), str(tmp_path / "o2"), ParallelConfig())
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_config_disagreeing_with_tensors_names_the_tensor(moe, tmp_path):
    _, hub, _ = moe
    bad = copy_dir(hub, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 40
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model.language_model.layers.\d.mlp.experts."
                                         r"(gate_up_proj|down_proj)': the config expects shape"):
        convert.hf_to_mcore(str(bad), str(tmp_path / "out"), ParallelConfig())


def test_layout_that_does_not_divide_the_model(moe, tmp_path):
    _, hub, _ = moe
    with pytest.raises(ValueError, match=r"parallel.ep \(3\) does not divide model.num_experts \(4\)"):
        convert.hf_to_mcore(str(hub), str(tmp_path / "out"), ParallelConfig(ep=3))
    assert cli(["convert", "hf-to-mcore", "--hf", str(hub), "--out", str(tmp_path / "o"), "--pp", "3"]) == 2


def test_interrupted_export_leaves_no_complete_looking_directory(moe, tmp_path, monkeypatch):
    _, hub, root = moe
    convert.hf_to_mcore(str(hub), str(tmp_path / "mc"), ParallelConfig())
    calls = {"n": 0}
    original = convert.McoreCheckpoint.full_tensor

    def failing(self, name):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt("interrupted")
        return original(self, name)

    monkeypatch.setattr(convert.McoreCheckpoint, "full_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "export"), max_shard_bytes=50_000)
    assert not (tmp_path / "export").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("export")]


def test_existing_output_is_not_overwritten(moe, tmp_path):
    _, hub, _ = moe
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert.hf_to_mcore(str(hub), str(tmp_path / "taken"), ParallelConfig())
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_transformer_engine_names_map_to_the_local_spec():
    from megatron_vlm.checkpoint.sharding import canonical_name

    layer = "language.decoder.layers.3."
    assert canonical_name(layer + "self_attention.linear_qkv.layer_norm_weight") == layer + "input_layernorm.weight"
    assert canonical_name(layer + "mlp.linear_fc1.layer_norm_weight") == layer + "pre_mlp_layernorm.weight"
    assert canonical_name(layer + "mlp.experts.linear_fc1.weight7") == layer + "mlp.experts.local_experts.7.linear_fc1.weight"
    assert canonical_name(layer + "mlp.experts.linear_fc2.weight0") == layer + "mlp.experts.local_experts.0.linear_fc2.weight"
    assert canonical_name(layer + "self_attention.linear_qkv.weight") == layer + "self_attention.linear_qkv.weight"


# --- partial directories -------------------------------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_run_partial(out: Path, pid: int, files=("dense-pp1-tp1.safetensors",)) -> Path:
    """What a conversion killed mid-way leaves: its partial directory with some rank files."""
    partial = out.parent / f"{out.name}.partial-{socket.gethostname()}-{pid}-0123abcd"
    partial.mkdir(parents=True)
    for name in files:
        (partial / name).write_bytes(b"left by a killed run")
    return partial


def test_rerun_after_a_killed_run_with_another_layout_has_only_its_own_files(moe, tmp_path, capsys):
    _, hub, _ = moe
    out = tmp_path / "mc"
    stale = killed_run_partial(out, dead_pid(), files=("dense-pp1-tp1.safetensors",
                                                       "experts-pp0-ep1-etp0.safetensors"))
    legacy = tmp_path / "mc.partial"  # an older version's fixed name: nobody can tell if it is live
    legacy.mkdir()
    (legacy / "dense-pp0-tp1.safetensors").write_bytes(b"old")
    assert cli(["convert", "hf-to-mcore", "--hf", str(hub), "--out", str(out), "--nproc", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dense-pp0-tp0.safetensors",
                                                                 "experts-pp0-ep0-etp0.safetensors"]
    assert convert.McoreCheckpoint(out).meta["layout"] == {"tp": 1, "pp": 1, "ep": 1, "etp": 1}
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}" in err
    assert legacy.is_dir() and f"note: {legacy} is another conversion's partial directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc", "mc.partial"]  # no partial of its own


def test_a_live_conversions_partial_directory_is_left_alone(moe, tmp_path, capsys):
    _, hub, _ = moe
    live = killed_run_partial(tmp_path / "mc", os.getpid())  # this process is alive
    convert.hf_to_mcore(str(hub), str(tmp_path / "mc"), ParallelConfig())
    assert live.is_dir() and f"note: {live}" in capsys.readouterr().err
    assert not (tmp_path / "mc" / "dense-pp1-tp1.safetensors").exists()


def test_each_conversion_gets_a_new_partial_directory_and_a_failed_one_removes_it(moe, tmp_path, monkeypatch):
    _, hub, _ = moe
    first, second = convert.new_partial_dir(tmp_path / "mc"), convert.new_partial_dir(tmp_path / "mc")
    assert first != second and first.is_dir() and second.is_dir() and not any(first.iterdir())
    first.rmdir()
    second.rmdir()
    original = convert._convert_file
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("interrupted")
        return original(*args)

    monkeypatch.setattr(convert, "_convert_file", failing)
    with pytest.raises(KeyboardInterrupt):
        convert.hf_to_mcore(str(hub), str(tmp_path / "mc"), ParallelConfig(ep=2, etp=1))
    assert list(tmp_path.iterdir()) == []


def test_a_worker_without_its_parents_partial_directory_is_refused(moe, tmp_path, monkeypatch, capsys):
    _, hub, _ = moe
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(convert.PARTIAL_ENV, raising=False)
    assert cli(["convert", "hf-to-mcore", "--hf", str(hub), "--out", str(tmp_path / "mc")]) == 2
    assert convert.PARTIAL_ENV in capsys.readouterr().err and not list(tmp_path.iterdir())
