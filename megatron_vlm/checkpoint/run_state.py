"""Save and resume the model side of a training run: weights, optimizer, scheduler, RNG, on any layout.

    save_checkpoint(root, "sft-step-4", model_chunks=[ddp], optimizer=opt, scheduler=sched,
                    extra_models={"reference": [ref.model]}, rank_state={...}, run_state={...},
                    config=cfg_dict, keep=cfg.train.checkpoint.keep)        # collective
    path = find_checkpoint(root, "auto")                                    # or a given path
    run_state, rank_state = load_checkpoint(path, model_chunks=[ddp], optimizer=opt,
                                            scheduler=sched, extra_models=...)  # collective

A checkpoint is a directory root/<tag>/:
  manifest.json               format, tag, saved_at, world_size, layout {tp,pp,cp,ep,etp,dp,edp},
                              every file's bytes and sha256, and the tensor table (below)
  model/<model>-rank{r}.safetensors   weights of `model` ("policy", or an extra_models key)
  optim/rank{r}.safetensors   optimizer state in model space: "<key>/<global name>" for key in
                              exp_avg, exp_avg_sq, step (0-dim), main (fp32 master weights, only
                              for non-fp32 params: an fp32 param is its own main param)
  rank/rank{r}.pt             rank r's rank_state plus its RNG states ("rng", see capture_rng)
  optimizer.pt                rank 0: param-group hyper-parameters (lr, max_lr, betas, ...) and
                              grad-scaler states, per sub-optimizer of megatron's ChainedOptimizer
  scheduler.json              rank 0: every attribute of megatron's OptimizerParamScheduler
                              (a superset of its state_dict: also init_lr, set_constant_lr's edits)
  run_state.pt, config.json   rank 0: the caller's run state (opaque; torch.save, so it may hold
                              tensors) and the resolved run config
Tensor data is safetensors (no pickle); every .pt loads with torch.load(weights_only=True).

Tensors are keyed by their global names (sharding.global_name: TP=PP=EP=1 names) and written once
per model-parallel coordinate: only by rank 0 of the tensor's data-parallel group (expert tensors:
the expert-data-parallel group), and a tensor not split over (expert) TP only by (expert) TP rank 0.
The tensor table in the manifest gives, per key, the full shape, dtype, split dim, whether it is a
SwiGLU [gate; up] stack, and the file holding each (expert) TP piece. Loading is the same code for
every layout: a param whose saved piece count equals this run's split reads its own piece; any other
split merges the saved pieces (sharding.merge_shards) and cuts this rank's (sharding.shard_tensor).
PP and EP changes need nothing more: global names say which layer and expert a tensor is.

Optimizer state: megatron's distributed optimizer keeps each param's main weight and Adam moments
as flat DP-range slices of its buffers. Saving assembles each param's full (param-shaped) state
across the optimizer's DP group (zeros + this rank's range, a reduce to DP rank 0); loading writes
each rank's DP range back (`_set_main_param_and_optimizer_states`). The non-distributed optimizers
(FP32Optimizer; Float16OptimizerWithFloat16Params with fp32 main copies) hold whole params. Adam's
per-param step is saved too; a state never stepped is saved as zeros and step 0, which torch's
AdamW treats exactly like a fresh state. The torch optimizer is what megatron uses without
Transformer Engine / apex (torch.optim.AdamW: state {step, exp_avg, exp_avg_sq}, tested here);
TE's FusedAdam (GPU) keeps step in its param groups, which are saved with their hyper-parameters
(untested: no TE on these machines); the precision-aware optimizer is refused.

Besides parameters, persistent buffers are saved (e.g. a router's expert bias, which aux-loss-free
balancing moves). A tied output layer (PP > 1 keeps a copy on the last stage) loads from the
embedding when the checkpoint has no copy of its own.

Write protocol (all ranks): the collectives first (the optimizer's DP assembly), then files under
root/<tag>.tmp-<nonce>/, each fsynced; one all-gather of the tensor tables, file digests and any
error; rank 0 writes its files and the manifest and fsyncs the directories; barrier; rank 0 renames
the directory to root/<tag>; barrier; rank 0 writes root/latest (temp file + os.replace) naming
the tag: the last write, so a crash at any point leaves `latest` on the previous complete
checkpoint. Then rank 0 prunes to the newest `keep` checkpoints (never the one `latest` names) and
removes stale *.tmp-* directories. Each barrier is an all-gather of errors: a failure on any rank
raises on every rank instead of leaving the others in a collective. root must be a directory every
rank sees (a shared filesystem across nodes).

Resume: `find_checkpoint(root, "auto")` verifies `latest`'s target (manifest parses, every file
present with its size and sha256) and else falls back to the newest earlier one that verifies,
reporting each rejected one with the reason. It reads every file: call it on one rank and broadcast
the path on large runs. `load_checkpoint` checks presence and sizes of all files and the sha256 of
the files this rank reads. On another layout (world size or tp/pp/ep/etp/dp) the model, optimizer
and scheduler carry over; per-rank state cannot, so rank_state comes back None and the RNG stays as
this run seeded it. One model chunk per model (no virtual pipeline).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from megatron_vlm.checkpoint.sharding import (RankLayout, canonical_name, global_name, is_expert_param,
                                              merge_shards, shard_tensor, split_dim)
from megatron_vlm.parallel.devices import collective_device

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
POLICY = "policy"
OPTIM = "optim"
_TIED_HEAD, _EMBEDDING = "output_layer.weight", "embedding.word_embeddings.weight"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or does not fit the model; names the file (a
    ValueError: the command line prints it as one line, like any bad input)."""


# -- RNG ------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This rank's generator states: python, numpy, torch CPU, every CUDA device, and megatron's
    CUDA RNG tracker (on CPU, cpu_compat makes its states CPU generator states)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    tracker = {}
    for name, value in get_cuda_rng_tracker().get_states().items():
        if not torch.is_tensor(value):  # cuda-graph-safe trackers hold generator objects
            raise TypeError(f"RNG tracker state {name!r} is a {type(value).__name__}, not a tensor")
        tracker[name] = value.clone()
    return {
        "python": (version, list(mt_state), gauss),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": tracker,
    }


def restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


# -- where a tensor sits and who writes it --------------------------------------------------------
@dataclass(frozen=True)
class _Site:
    key: str               # global name
    dim: int | None        # split dim over (expert) TP
    piece: int             # this rank's piece index along dim (0 when not split)
    pieces: int            # how many pieces the tensor has at this layout
    gated: bool            # [gate; up] stack (SwiGLU linear_fc1)
    copy: bool             # an unsplit tensor on (expert) TP rank > 0: TP rank 0 writes it
    writer: bool           # this rank writes it: rank 0 of its DP group, and not a copy


def _chunk(chunks: list):
    """The one model of `chunks`, without its DDP / Float16Module wrappers."""
    from megatron.core.utils import unwrap_model

    if len(chunks) != 1:
        raise NotImplementedError(f"{len(chunks)} model chunks: one chunk per model (no virtual "
                                  f"pipeline) is supported")
    return unwrap_model(chunks[0])


def _site(name: str, tensor: torch.Tensor, layout: RankLayout, is_param: bool) -> _Site:
    from megatron.core import parallel_state as ps

    canonical = canonical_name(name)
    expert = is_expert_param(canonical)
    dim = split_dim(canonical, tensor) if is_param else None
    tp_rank, tp_size = (layout.etp_rank, layout.etp_size) if expert else (layout.tp_rank, layout.tp_size)
    rank, size = (0, 1) if dim is None else (tp_rank, tp_size)
    dp_rank = (ps.get_expert_data_parallel_rank() if expert
               else ps.get_data_parallel_rank(with_context_parallel=True))
    copy = dim is None and tp_rank != 0
    gated = layout.gated_linear_unit and canonical.endswith("linear_fc1.weight")
    return _Site(global_name(canonical, layout), dim, rank, size, gated, copy,
                 writer=dp_rank == 0 and not copy)


def _model_tensors(model) -> list[tuple[str, torch.Tensor, bool]]:
    """(local name, tensor, is a parameter): every parameter and every persistent buffer (e.g. the
    router's expert bias that aux-loss-free balancing moves)."""
    tensors = [(name, param, True) for name, param in model.named_parameters()]
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors.append((f"{module_name}.{name}" if module_name else name, buffer, False))
    return tensors


def _world_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "edp": ps.get_expert_data_parallel_world_size()}


# -- files ----------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _rank_file(kind: str, rank: int) -> str:
    """Rank `rank`'s file of `kind`: "rank" (rank state), OPTIM, or a model's name."""
    if kind == "rank":
        return f"rank/rank{rank:05d}.pt"
    if kind == OPTIM:
        return f"optim/rank{rank:05d}.safetensors"
    return f"model/{kind}-rank{rank:05d}.safetensors"


# -- save -----------------------------------------------------------------------------------------
def save_checkpoint(root: Path, tag: str, *, model_chunks: list, optimizer, scheduler,
                    extra_models: dict[str, list] | None, rank_state: dict, run_state: dict | None,
                    config: dict | None, keep: int) -> Path:
    """Collective: write root/<tag> (see the module docstring), point root/latest at it, prune to
    the newest `keep`. Returns the checkpoint's path. A failure on any rank raises on every rank
    (no rank is left waiting in a collective) and leaves `latest` as it was."""
    _check_save_args(tag, keep, extra_models or {})
    models = {POLICY: model_chunks, **(extra_models or {})}
    dist, rank = torch.distributed, torch.distributed.get_rank()
    root = Path(root)
    names = [f"{tag}.tmp-{uuid.uuid4().hex[:12]}" if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    tmp, final = root / names[0], root / tag
    # Everything collective first (the optimizer's DP assembly), then the writes, which may fail.
    pieces = {f"model/{kind}": _model_pieces(_chunk(chunks)) for kind, chunks in models.items()}
    pieces[OPTIM] = _optimizer_pieces(_chunk(model_chunks), optimizer)
    table = files = error = None
    try:
        table, files = _write_rank_files(tmp, rank, pieces, {"rank_state": rank_state,
                                                            "rng": capture_rng()})
    except Exception as e:  # noqa: BLE001  reported on every rank below
        error = e
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (table, files, _param_groups(optimizer), _describe(error)))
    _raise_if_any_failed(error, [g[3] for g in gathered], f"saving {tmp}")

    def on_rank0(step):
        failure = None
        if rank == 0:
            try:
                step()
            except Exception as e:  # noqa: BLE001
                failure = e
        _all_ranks_ok(failure, f"saving {final}")  # also the barrier between the steps

    on_rank0(lambda: _write_rank0(tmp, tag, gathered, optimizer, scheduler, run_state, config))
    on_rank0(lambda: _publish(tmp, final))
    on_rank0(lambda: (_write_latest(root, tag), _prune(root, keep)))
    return final


def _check_save_args(tag: str, keep: int, extra_models: dict) -> None:
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    if not _PLAIN_NAME.fullmatch(tag) or tag == LATEST or ".tmp-" in tag:
        raise ValueError(f"checkpoint tag {tag!r}: letters, digits, '.', '_', '-' only, not 'latest'")
    for kind in extra_models:
        if not _PLAIN_NAME.fullmatch(kind) or kind == POLICY:
            raise ValueError(f"extra_models key {kind!r}: letters, digits, '.', '_', '-' only, "
                             f"not {POLICY!r}")


def _write_rank_files(tmp: Path, rank: int, pieces: dict, state: dict) -> tuple[dict, dict]:
    """This rank's files; returns its part of the tensor table and its files' digests."""
    table, files = {}, {}
    for group, (tensors, entries) in pieces.items():
        name = _rank_file(group.removeprefix("model/"), rank)
        files[name] = _write_bytes(tmp / name, save(tensors))
        table[group] = {key: dict(entry, file=name) for key, entry in entries.items()}
    name = _rank_file("rank", rank)
    files[name] = _write_bytes(tmp / name, _torch_bytes(state))
    return table, files


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_if_any_failed(error: BaseException | None, reports: list, what: str) -> None:
    failed = [(r, report) for r, report in enumerate(reports) if report]
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")


def _all_ranks_ok(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when any rank failed (its own error where it failed)."""
    reports = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, _describe(error))
    _raise_if_any_failed(error, reports, what)


def _model_pieces(model) -> tuple[dict, dict]:
    """This rank's tensors to write, keyed by global name, and their table entries."""
    layout = RankLayout.current(model.config)
    tensors, entries = {}, {}
    for name, tensor, is_param in _model_tensors(model):
        site = _site(name, tensor, layout, is_param)
        if site.writer:
            tensors[site.key] = tensor.detach().to("cpu", copy=True).contiguous()
            entries[site.key] = _entry(site, tensor)
    return tensors, entries


def _entry(site: _Site, tensor: torch.Tensor) -> dict:
    shape = list(tensor.shape)
    if site.dim is not None:
        shape[site.dim] *= site.pieces
    return {"shape": shape, "dtype": str(tensor.dtype).removeprefix("torch."), "dim": site.dim,
            "gated": site.gated, "piece": site.piece, "pieces": site.pieces}


def _merge_tables(gathered: list) -> tuple[dict, dict]:
    """The ranks' tables as one: per key, the file of each of its pieces; and all file digests."""
    table, files = {}, {}
    for rank_table, rank_files, *_ in gathered:
        files.update(rank_files)
        for group, entries in rank_table.items():
            merged = table.setdefault(group, {})
            for key, entry in entries.items():
                record = merged.setdefault(key, {k: v for k, v in entry.items()
                                                 if k not in ("file", "piece")})
                record.setdefault("files", [None] * entry["pieces"])[entry["piece"]] = entry["file"]
    for group, entries in table.items():
        for key, entry in entries.items():
            if None in entry["files"]:  # a writer rule that missed a coordinate: never publish it
                raise RuntimeError(f"{group} {key}: no rank wrote piece {entry['files'].index(None)}")
    return table, files


def _write_rank0(tmp: Path, tag: str, gathered: list, optimizer, scheduler, run_state, config):
    table, files = _merge_tables(gathered)
    groups = {}
    for _, _, rank_groups, _ in gathered:  # alike on every rank that has the group
        for sub, sub_groups in enumerate(rank_groups):
            for identity, hyper in sub_groups:
                groups.setdefault((sub, identity), hyper)
    scalers = [_scaler_state(opt) for opt in _sub_optimizers(optimizer)]
    files["optimizer.pt"] = _write_bytes(tmp / "optimizer.pt", _torch_bytes(
        {"param_groups": [(sub, identity, hyper) for (sub, identity), hyper in groups.items()],
         "grad_scalers": scalers}))
    sched = {k: v for k, v in vars(scheduler).items() if k != "optimizer"}
    files["scheduler.json"] = _write_bytes(tmp / "scheduler.json", json.dumps(sched).encode())
    files["run_state.pt"] = _write_bytes(tmp / "run_state.pt", _torch_bytes(run_state))
    files["config.json"] = _write_bytes(tmp / "config.json", json.dumps(config, default=str).encode())
    manifest = {"format": FORMAT, "tag": tag, "saved_at": time.time(),
                "world_size": torch.distributed.get_world_size(), "layout": _world_layout(),
                "files": dict(sorted(files.items())), "tensors": table}
    _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    for directory in {(tmp / name).parent for name in files} | {tmp}:
        _fsync_dir(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place (an older one of the same tag is replaced)."""
    if final.exists():
        old = final.with_name(f"{final.name}.tmp-replaced-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    _write_bytes(tmp, (tag + "\n").encode())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep: int) -> None:
    latest = read_latest(root)
    for stale in root.glob("*.tmp-*"):  # crashed saves (ours is renamed by now)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    ordered = _checkpoints_newest_first(root)
    kept = [p for p in ordered if p.name == latest][:1]
    kept += [p for p in ordered if p.name != latest][:max(0, keep - len(kept))]
    for path in ordered:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


# -- optimizer state in model space ---------------------------------------------------------------
def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@dataclass
class _Slot:
    """One model param's optimizer state on this rank: its flattened range [start, end) (the whole
    param unless the distributed optimizer shards it), main weight and Adam tensors of that range."""
    param: torch.nn.Parameter
    start: int
    end: int
    main: torch.Tensor | None      # None: the model param is its own main param (fp32)
    state: dict                    # the torch optimizer's state dict of the main param
    group: object | None           # the distributed optimizer's DP group, else None


def _slots(opt) -> list[_Slot]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(opt.config, "use_precision_aware_optimizer", False):
        raise NotImplementedError("use_precision_aware_optimizer: TE FusedAdam keeps the main "
                                  "params and scaled moments inside itself; not supported here")
    if isinstance(opt, DistributedOptimizer):
        slots = []
        for buffer in opt.buffers:
            for param in buffer.params:
                if param not in opt.model_param_group_index_map:  # no range on this DP rank
                    slots.append(_Slot(param, 0, 0, None, {}, opt.data_parallel_group))
                    continue
                r = opt._get_model_param_range_map(param)["param"]
                index, order = opt.model_param_group_index_map[param]
                main = opt.optimizer.param_groups[index]["params"][order]
                slots.append(_Slot(param, r.start, r.end, None if param.dtype == torch.float32 else main,
                                   opt.optimizer.state[main], opt.data_parallel_group))
        return slots
    pairs = []
    if hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            pairs += list(zip(model_group, main_group))
        pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
    else:  # FP32Optimizer: the model params themselves
        pairs = [(p, p) for group in opt.optimizer.param_groups for p in group["params"]]
    return [_Slot(p, 0, p.numel(), None if main is p else main, opt.optimizer.state[main], None)
            for p, main in pairs]


def _adam_keys(opt) -> list[str]:
    keys = ["exp_avg", "exp_avg_sq"]
    if any(g.get("amsgrad") for g in opt.optimizer.param_groups):
        keys.append("max_exp_avg_sq")
    return keys


@torch.no_grad()
def _optimizer_pieces(model, optimizer) -> tuple[dict, dict]:
    """Param-shaped fp32 main weights, moments and steps of this rank's params, for the writers."""
    layout = RankLayout.current(model.config)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, entries = {}, {}
    for opt in _sub_optimizers(optimizer):
        keys = _adam_keys(opt)
        for slot in _slots(opt):
            site = _site(names[id(slot.param)], slot.param, layout, True)
            if site.copy:  # the whole DP group holds a copy: it skips the tensor alike
                continue
            full = _assemble(slot, keys, site)
            if full is None:
                continue
            step = full.pop("step")
            for key, value in full.items():
                tensors[f"{key}/{site.key}"] = value
                entries[f"{key}/{site.key}"] = _entry(site, value)
            if site.piece == 0:  # a scalar: once, not per TP piece
                tensors[f"step/{site.key}"] = step
                entries[f"step/{site.key}"] = _entry(replace(site, dim=None, pieces=1), step)
    return tensors, entries


def _assemble(slot: _Slot, keys: list[str], site: _Site) -> dict | None:
    """{key: param-shaped fp32 tensor, "step": 0-dim} on the writer (None elsewhere). A distributed
    optimizer's slices are summed into zeros over its DP group (the ranges are disjoint, so the sum
    is exact), reduced to DP rank 0."""
    param = slot.param
    rows = (["main"] if param.dtype != torch.float32 else []) + keys
    if slot.group is None:
        if not site.writer:
            return None
        values = [slot.main if key == "main" else slot.state.get(key) for key in rows]
        step = slot.state.get("step")
        out = {k: (v if v is not None else torch.zeros(param.shape)).detach().float().cpu()
               .reshape(param.shape).clone() for k, v in zip(rows, values)}
        out["step"] = _step_tensor(step)
        return out
    dist = torch.distributed
    device = collective_device(slot.group)
    writer_rank = dist.get_global_rank(slot.group, 0)
    is_writer = dist.get_rank() == writer_rank
    out = {}
    for key in rows:  # one param-sized buffer at a time
        buffer = torch.zeros(param.numel(), dtype=torch.float32, device=device)
        value = slot.main if key == "main" else slot.state.get(key)
        if slot.end > slot.start and value is not None:
            buffer[slot.start:slot.end] = value.detach().float().to(device)
        dist.reduce(buffer, dst=writer_rank, group=slot.group)
        if is_writer:
            out[key] = buffer.cpu().reshape(param.shape)
    step = torch.tensor([float(slot.state["step"]) if "step" in slot.state else 0.0], device=device)
    dist.reduce(step, dst=writer_rank, group=slot.group, op=dist.ReduceOp.MAX)
    if not is_writer:
        return None
    out["step"] = step[0].cpu().clone()
    return out


def _step_tensor(step) -> torch.Tensor:
    if step is None:
        return torch.tensor(0.0)
    return step.detach().float().cpu().clone() if torch.is_tensor(step) else torch.tensor(float(step))


_GROUP_IDENTITY = ("is_expert_parallel", "wd_mult", "lr_mult", "is_decoupled_lr", "default_config")


def _param_groups(optimizer) -> list[list[tuple]]:
    """Per sub-optimizer, (identity, hyper-parameters) of each param group (everything but params)."""
    out = []
    for opt in _sub_optimizers(optimizer):
        out.append([(tuple(g.get(k) for k in _GROUP_IDENTITY),
                     {k: v for k, v in g.items() if k != "params"})
                    for g in opt.optimizer.param_groups])
    return out


def _scaler_state(opt):
    scaler = getattr(opt, "grad_scaler", None)
    return scaler.state_dict() if scaler is not None else None


# -- verify and find ------------------------------------------------------------------------------
def read_latest(root: Path) -> str | None:
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def read_manifest(path: Path) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (an interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_path}: does not parse ({error})") from None
    for key in ("format", "world_size", "layout", "files", "tensors"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path}: no {key!r} entry")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest['format']} is not {FORMAT}")
    for rank in range(manifest["world_size"]):  # a save of world_size ranks wrote a file per rank
        if _rank_file("rank", rank) not in manifest["files"]:
            raise CheckpointError(f"{manifest_path}: lists no {_rank_file('rank', rank)} though "
                                  f"world_size is {manifest['world_size']}")
    return manifest


def verify_checkpoint(path: Path, check_hashes: bool | set[str] = True) -> dict:
    """The manifest, after checking every file it lists is there with its size (and sha256: all
    files, or only those named in `check_hashes`). Raises CheckpointError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} missing{_whose(name)}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {name} size mismatch (manifest {info['bytes']} bytes, "
                                  f"file {size})")
        if (check_hashes is True or (check_hashes and name in check_hashes)) and \
                _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} sha256 mismatch")
    return manifest


_RANK_FILE = re.compile(r"^(?:model/(?P<model>.+)-|optim/|rank/)rank(?P<rank>\d+)\.")


def _whose(name: str) -> str:
    """' (rank1 policy model file)' for a rank file's name, '' for rank 0's own files."""
    m = _RANK_FILE.match(name)
    if not m:
        return ""
    what = (f"{m.group('model')} model" if m.group("model")
            else "optimizer" if name.startswith("optim/") else "rank state")
    return f" (rank{int(m.group('rank'))} {what} file)"


def _saved_at(path: Path) -> float:
    try:
        return float(json.loads((path / MANIFEST).read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return path.stat().st_mtime


def _checkpoints_newest_first(root: Path) -> list[Path]:
    found = [p for p in Path(root).iterdir() if p.is_dir() and ".tmp-" not in p.name]
    return sorted(found, key=_saved_at, reverse=True)


def find_checkpoint(root: Path, resume: str, log=None) -> Path | None:
    """resume "auto": the checkpoint root/latest names if it verifies, else the newest earlier one
    that does (each rejected one reported through `log`, default stderr); None when root holds no
    checkpoint at all; CheckpointError when some exist and none verifies. A directory newer than
    `latest`'s is a save that did not finish (latest is written last) and is never chosen. Any
    other `resume` is a checkpoint path, which must verify (CheckpointError naming the file)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if resume != "auto":
        verify_checkpoint(Path(resume))
        return Path(resume)
    root = Path(root)
    if not root.is_dir():
        return None
    ordered = _checkpoints_newest_first(root)
    latest = read_latest(root)
    if latest is not None and (root / latest).is_dir():
        limit = _saved_at(root / latest)
        ordered = [root / latest] + [p for p in ordered if p.name != latest and _saved_at(p) <= limit]
    elif latest is not None:
        log(f"{root / LATEST} names {latest!r}, which does not exist")
    if not ordered:
        return None
    reasons = []
    for path in ordered:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            reasons.append(str(error))
            log(f"checkpoint rejected: {error}")
    raise CheckpointError(f"no checkpoint under {root} verifies: " + "; ".join(reasons))


# -- load -----------------------------------------------------------------------------------------
class _Reader:
    """Reads this rank's pieces of global tensors from the checkpoint's rank files, merging and
    re-cutting when this run splits a tensor differently than the saved run did."""

    def __init__(self, path: Path, manifest: dict, check_hashes: bool = True):
        self.path, self.manifest, self.handles = path, manifest, {}
        self.check_hashes, self.checked = check_hashes, set()

    def close(self):
        self.handles.clear()

    def _checked(self, file: str) -> Path:
        """The file's path, after comparing its sha256 with the manifest's (once per file)."""
        if self.check_hashes and file not in self.checked:
            if _sha256(self.path / file) != self.manifest["files"][file]["sha256"]:
                raise CheckpointError(f"{self.path}: {file} sha256 mismatch")
            self.checked.add(file)
        return self.path / file

    def read_bytes(self, file: str) -> bytes:
        return self._checked(file).read_bytes()

    def torch_load(self, file: str):
        return torch.load(self._checked(file), weights_only=True)

    def _get(self, file: str, key: str) -> torch.Tensor:
        if file not in self.handles:
            self.handles[file] = safe_open(str(self._checked(file)), framework="pt")
        handle = self.handles[file]
        if key not in handle.keys():
            raise CheckpointError(f"{self.path}: {file} has no tensor {key!r}")
        return handle.get_tensor(key)

    def entry(self, group: str, key: str) -> tuple[str, dict] | None:
        table = self.manifest["tensors"].get(group, {})
        if key in table:
            return key, table[key]
        if key.endswith(_TIED_HEAD):  # a tied head saved at PP=1 exists only as the embedding
            tied = key[: -len(_TIED_HEAD)] + _EMBEDDING
            if tied in table:
                return tied, table[tied]
        return None

    def local(self, group: str, key: str, site: _Site, name: str, layout: RankLayout,
              shape: torch.Size) -> torch.Tensor:
        found = self.entry(group, key)
        if found is None:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in {group} (this run's {name})")
        key, entry = found
        saved = entry["pieces"]
        if entry["dim"] is None or saved == site.pieces:
            piece = self._get(entry["files"][site.piece if entry["dim"] is not None else 0], key)
        else:
            full = merge_shards([self._get(f, key) for f in entry["files"]], entry["dim"], entry["gated"])
            piece = shard_tensor(full, canonical_name(name), site.dim, layout)
        if piece.shape != shape:
            raise CheckpointError(f"{self.path}: tensor {key!r} gives shape {list(piece.shape)} on this "
                                  f"rank, the model's {name} has {list(shape)}")
        return piece


def full_state(path: Path, group: str = f"model/{POLICY}") -> dict[str, torch.Tensor]:
    """Every tensor of `group` ("model/<model>" or "optim") as the full TP=PP=EP=1 tensor, merged
    from the rank files (one process, no model): for inspection, tests and offline tools."""
    path = Path(path)
    reader = _Reader(path, verify_checkpoint(path, check_hashes=False), check_hashes=False)
    table = reader.manifest["tensors"].get(group)
    if table is None:
        raise CheckpointError(f"{path}: no {group!r} tensors (has {sorted(reader.manifest['tensors'])})")
    try:
        return {key: merge_shards([reader._get(f, key) for f in entry["files"]], entry["dim"],
                                  entry["gated"]) for key, entry in table.items()}
    finally:
        reader.close()


def load_checkpoint(path: Path, *, model_chunks, optimizer, scheduler,
                    extra_models: dict[str, list] | None = None,
                    optional_models: frozenset[str] = frozenset()) -> tuple[object, dict | None]:
    """Collective: restore weights (the policy and each extra model), optimizer, scheduler and, at
    the saved layout, this rank's RNG. Returns (run_state, this rank's rank_state); rank_state is
    None on another layout (see the module docstring). Every file's presence and size is checked,
    and the sha256 of each file this rank reads; a failure on any rank raises on every rank. An
    extra model named in `optional_models` that the checkpoint lacks is left as it is, and listed
    in run_state["models_not_saved"] (the caller decides whether it can do without)."""
    path, error, result = Path(path), None, (None, None)
    try:
        result = _load_local(path, model_chunks, optimizer, scheduler, extra_models or {}, optional_models)
    except Exception as e:  # noqa: BLE001  reported on every rank
        error = e
    _all_ranks_ok(error, f"loading {path}")
    return result


def _load_local(path: Path, model_chunks, optimizer, scheduler, extra_models: dict, optional_models=frozenset()):
    manifest = verify_checkpoint(path, check_hashes=False)
    same_layout = (manifest["world_size"] == torch.distributed.get_world_size()
                   and manifest["layout"] == _world_layout())
    not_saved = [kind for kind in extra_models
                 if kind in optional_models and f"model/{kind}" not in manifest["tensors"]]
    models = {POLICY: model_chunks, **{kind: chunks for kind, chunks in extra_models.items() if kind not in not_saved}}
    missing = [kind for kind in models if f"model/{kind}" not in manifest["tensors"]]
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]!r} model saved (saved: "
                              f"{sorted(k for k in manifest['tensors'] if k.startswith('model/'))})")
    reader = _Reader(path, manifest)
    try:
        for kind, chunks in models.items():
            _load_model(reader, f"model/{kind}", _chunk(chunks))
        _load_optimizer(reader, _chunk(model_chunks), optimizer)
        _load_hyper(reader, optimizer)
        for key, value in json.loads(reader.read_bytes("scheduler.json")).items():
            setattr(scheduler, key, value)
        run_state = {**reader.torch_load("run_state.pt"), "models_not_saved": not_saved}
        rank_state = None
        if same_layout:
            state = reader.torch_load(_rank_file("rank", torch.distributed.get_rank()))
            restore_rng(state["rng"])
            rank_state = state["rank_state"]
    finally:
        reader.close()
    return run_state, rank_state


@torch.no_grad()
def _load_model(reader: _Reader, group: str, model) -> None:
    layout = RankLayout.current(model.config)
    for name, tensor, is_param in _model_tensors(model):
        site = _site(name, tensor, layout, is_param)
        tensor.copy_(reader.local(group, site.key, site, name, layout, tensor.shape))


def _ensure_state(opt) -> None:
    """Adam state for every main param (zeros, step 0: what torch's AdamW starts from, as
    megatron's own init_state_fn does), so a checkpoint can be copied into an optimizer that has
    not stepped yet. torch keeps a step per param; TE / apex FusedAdam keep it in the param groups
    (restored with the groups' hyper-parameters)."""
    per_param_step = isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for group in opt.optimizer.param_groups:
        for main in group["params"]:
            state = opt.optimizer.state[main]
            if not state:
                if per_param_step:
                    state["step"] = torch.tensor(0.0)
                for key in _adam_keys(opt):
                    state[key] = torch.zeros_like(main, memory_format=torch.preserve_format)


@torch.no_grad()
def _load_optimizer(reader: _Reader, model, optimizer) -> None:
    layout = RankLayout.current(model.config)
    names = {id(p): n for n, p in model.named_parameters()}
    for opt in _sub_optimizers(optimizer):
        _ensure_state(opt)
        for slot in _slots(opt):
            if slot.end <= slot.start:
                continue
            name = names[id(slot.param)]
            site = _site(name, slot.param, layout, True)

            def read(key, shape=slot.param.shape):
                return reader.local(OPTIM, f"{key}/{site.key}", site, name, layout, shape)

            if slot.main is not None:
                slot.main.copy_(read("main").reshape(-1)[slot.start:slot.end].view_as(slot.main))
            for key in _adam_keys(opt):
                target = slot.state[key]
                target.copy_(read(key).reshape(-1)[slot.start:slot.end].view_as(target))
            if "step" in slot.state:
                slot.state["step"] = read("step", torch.Size([])).to(slot.state["step"].dtype).clone()


def _load_hyper(reader: _Reader, optimizer) -> None:
    """Param-group hyper-parameters by group identity, and grad-scaler states."""
    saved = reader.torch_load("optimizer.pt")
    by_identity = {(sub, tuple(identity)): hyper for sub, identity, hyper in saved["param_groups"]}
    for sub, opt in enumerate(_sub_optimizers(optimizer)):
        for group in opt.optimizer.param_groups:
            identity = tuple(group.get(k) for k in _GROUP_IDENTITY)
            hyper = by_identity.get((sub, identity))
            if hyper is None:
                raise CheckpointError(f"{reader.path}: optimizer.pt has no param group "
                                      f"{dict(zip(_GROUP_IDENTITY, identity))} for sub-optimizer {sub}")
            group.update(hyper)
        scaler, states = getattr(opt, "grad_scaler", None), saved["grad_scalers"]
        if scaler is not None and sub < len(states) and states[sub] is not None:
            scaler.load_state_dict(states[sub])
