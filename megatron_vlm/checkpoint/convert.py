"""HF <-> megatron checkpoint conversion, streaming, single- or multi-process, no model built.

The megatron checkpoint is a directory of per-rank safetensors files in local parameter names:
  megatron_vlm_checkpoint.json   format, architecture, layout {tp, pp, ep, etp}, layer counts
  hf/                            the HF config, tokenizer, processor and chat-template files
  dense-pp{P}-tp{T}.safetensors            every non-expert tensor of stage P, TP rank T
  experts-pp{P}-ep{E}-etp{X}.safetensors   the experts of stage P on EP rank E, expert-TP rank X
A rank of any DP / CP replica loads the two files its (pp, tp, ep, etp) coordinates name
(`load_into_model`). Files are independent, so conversion parallelises over them: with N
processes, process i writes files i, i+N, ... (`part`), and the parent finalises.

Files are written into a partial directory next to the output, `OUT.partial-HOST-PID-TOKEN`, and
renamed into place once all are there. It is unique per conversion and never reused (a rerun with
another layout must not pick up a killed run's rank files); the --nproc workers write into their
parent's, named in PARTIAL_ENV. At start-up, the partial directories of conversions whose process
is gone from this host are removed; any other is named on stderr and left alone.

Memory: hf-to-mcore holds one output file plus the rule being converted (at most one layer's
fused experts); mcore-to-hf holds one HF shard plus one rule's tensors, read lazily from the rank
files. Errors name the file or tensor: a missing or truncated shard, a tensor whose shape disagrees
with the config, a layout that does not divide the model.

A live model starts from either kind of directory (`load_weights`, told apart by their files): a
megatron_vlm checkpoint of the run's layout loads each rank's own two files; an HF directory loads
shard by shard, each rank reading only its slice of every tensor (`load_hf_into_model`: its
pipeline stage's layers, its experts, its TP rows or columns), never the full model.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_vlm.checkpoint.hf_io import (INDEX, SINGLE, HFCheckpointReader, ShardedWriter,
                                           copy_side_files, open_safetensors)
from megatron_vlm.checkpoint.hf_rules import check_hf_keys, qkv
from megatron_vlm.checkpoint.sharding import (RankLayout, canonical_name, global_name,
                                              is_expert_param, local_name, merge_shards,
                                              partition_dim_of, shard_tensor, split_dim)
from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig

META = "megatron_vlm_checkpoint.json"
FORMAT = 1
PARTIAL_ENV = "MEGATRON_VLM_CONVERT_PARTIAL"  # a --nproc worker's partial directory (its parent's)


@dataclass(frozen=True)
class FileSpec:
    """One output file: which tensors (dense or experts) of which rank coordinates."""
    kind: str  # "dense" | "experts"
    pp: int
    tp: int = 0
    ep: int = 0
    etp: int = 0

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return f"dense-pp{self.pp}-tp{self.tp}.safetensors"
        return f"experts-pp{self.pp}-ep{self.ep}-etp{self.etp}.safetensors"

    def layout(self, lm, parallel: ParallelConfig) -> RankLayout:
        per_stage = lm.num_layers // parallel.pp
        return RankLayout(tp_rank=self.tp, tp_size=parallel.tp, etp_rank=self.etp,
                          etp_size=parallel.expert_tp, ep_rank=self.ep, ep_size=parallel.ep,
                          layer_offset=self.pp * per_stage,
                          num_local_experts=(lm.num_experts or 1) // parallel.ep,
                          layers_per_stage=per_stage, is_last_stage=self.pp == parallel.pp - 1)


def file_specs(lm, parallel: ParallelConfig) -> list[FileSpec]:
    specs = [FileSpec("dense", pp, tp=tp) for pp in range(parallel.pp) for tp in range(parallel.tp)]
    if lm.num_experts:
        specs += [FileSpec("experts", pp, ep=ep, etp=etp) for pp in range(parallel.pp)
                  for ep in range(parallel.ep) for etp in range(parallel.expert_tp)]
    return specs


def _progress(label: str, done: int, total: int, start: float) -> None:
    print(f"[{label}] {done}/{total} files, {time.time() - start:.1f}s", file=sys.stderr, flush=True)


# --- HF -> megatron ------------------------------------------------------------------------------
def hf_to_mcore(hf_dir: str, out_dir: str, parallel: ParallelConfig, part: tuple[int, int] = (0, 1),
                finalize: bool = True, partial: str | Path | None = None) -> Path:
    """Write this process's `part` of the rank files into `partial` (default: a new partial
    directory, removed if the conversion fails), then, with `finalize`, move them to `out_dir`."""
    reader = HFCheckpointReader(hf_dir)
    hf_config = reader.config()
    family = family_for(hf_config)
    lm = family.language_config(hf_config)
    lm.check_layout(parallel)
    rules = family.hf_rules(hf_config)
    check_hf_source(family, hf_config, reader)
    out = Path(out_dir)
    tmp = Path(partial) if partial is not None else new_partial_dir(out)
    specs = file_specs(lm, parallel)
    mine = specs[part[0]::part[1]]
    start = time.time()
    try:
        for done, spec in enumerate(mine, start=1):
            tensors = _convert_file(spec, rules, reader, lm, parallel)
            save_file(tensors, str(tmp / spec.name), metadata={"format": "pt"})
            del tensors
            _progress(f"hf-to-mcore {part[0]}/{part[1]}", done, len(mine), start)
        if finalize:
            finalize_mcore(hf_dir, out, parallel, tmp)
    except BaseException:
        if partial is None:  # a caller's directory is the caller's to clean up
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert_file(spec: FileSpec, rules, reader, lm, parallel) -> dict[str, torch.Tensor]:
    layout = spec.layout(lm, parallel)
    tensors: dict[str, torch.Tensor] = {}
    for rule in rules:
        wanted = [(i, name) for i, name in enumerate(rule.mcore)
                  if is_expert_param(name) == (spec.kind == "experts")
                  and local_name(name, layout) is not None]
        if not wanted:
            continue
        full = rule.to_mcore([reader.get(n) for n in rule.hf])
        for i, name in wanted:
            local = local_name(name, layout)
            tensors[local] = shard_tensor(full[i], local, partition_dim_of(name), layout).clone()
    if lm.tie_word_embeddings and parallel.pp > 1 and spec.kind == "dense" and layout.is_last_stage:
        # megatron keeps a synced copy of a tied embedding as the last stage's output layer
        embed = next(r for r in rules if "language.embedding.word_embeddings.weight" in r.mcore)
        full = embed.to_mcore([reader.get(n) for n in embed.hf])[0]
        tensors["language.output_layer.weight"] = shard_tensor(
            full, "language.output_layer.weight", 0, layout).clone()
    return tensors


def check_hf_source(family, hf_config, reader) -> None:
    """Every tensor the family's rules need is in the checkpoint, nothing else, each in the shape
    the config implies (headers only: nothing is read)."""
    # Some checkpoints store the tied output projection anyway; it is the embedding, so skip it.
    tied_copy = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    check_hf_keys(family.hf_rules(hf_config), reader.keys() - tied_copy, str(reader.dir))
    check_hf_shapes(family, hf_config, reader)


def check_hf_shapes(family, hf_config, reader) -> None:
    """Compare every tensor with the shape the config implies (model built on the meta device)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in family.hf_model_class(hf_config).state_dict().items()}
    for name in reader.keys():
        found = reader.shape(name)
        want = expected.get(name)
        if want is None:
            continue
        fused_hub = len(want) == 3 and name.endswith(("gate_up_proj", "down_proj"))
        if found != want and not (fused_hub and found == (want[0], want[2], want[1])):
            raise ValueError(f"tensor {name!r}: the config expects shape {list(want)}, the "
                             f"checkpoint has {list(found)}")


def new_partial_dir(out: str | Path) -> Path:
    """A new, empty partial directory for one conversion to `out` (see the module docstring)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_partials(out)
    tmp = out.parent / f"{out.name}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def clear_stale_partials(out: Path) -> None:
    """Remove the partial directories for `out` whose conversion process is gone from this host;
    name the others (live, another host's, or an older version's `OUT.partial`) on stderr."""
    pattern = re.compile(re.escape(out.name) + r"\.partial-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
    here = socket.gethostname()
    partials = [p for p in out.parent.iterdir() if p.is_dir() and p.name.startswith(f"{out.name}.partial")]
    for path in sorted(partials):
        match = pattern.fullmatch(path.name)
        if match and match["host"] == here and not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}: a partial conversion whose process {match['pid']} is gone",
                  file=sys.stderr)
        else:
            print(f"note: {path} is another conversion's partial directory (running, on another "
                  f"host, or killed under an older version); remove it if none is running",
                  file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def finalize_mcore(hf_dir, out: str | Path, parallel: ParallelConfig, partial: str | Path) -> Path:
    """Check every rank file is in `partial`, add metadata and the HF side files, rename it into
    place as `out`."""
    hf_config = HFCheckpointReader(hf_dir).config()
    lm = family_for(hf_config).language_config(hf_config)
    out = Path(out)
    tmp = Path(partial)
    missing = [s.name for s in file_specs(lm, parallel) if not (tmp / s.name).is_file()]
    if missing:
        raise RuntimeError(f"conversion incomplete, missing {missing[:3]} in {tmp}")
    side = tmp / "hf"
    side.mkdir(exist_ok=True)
    copy_side_files(Path(hf_dir), side)
    hf_config.save_pretrained(str(side))
    meta = {"format": FORMAT, "architecture": hf_config.architectures[0],
            "layout": {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep,
                       "etp": parallel.expert_tp},
            "num_layers": lm.num_layers, "num_experts": lm.num_experts}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


# --- megatron -> HF ------------------------------------------------------------------------------
class McoreCheckpoint:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {META} (not a megatron_vlm checkpoint, or an "
                                    f"interrupted conversion)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')} is not {FORMAT}")
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(str(self.dir / "hf"))
        self.family = family_for(self.hf_config)
        self.lm = self.family.language_config(self.hf_config)
        self.parallel = ParallelConfig(**self.meta["layout"])
        missing = [s.name for s in file_specs(self.lm, self.parallel) if not (self.dir / s.name).is_file()]
        if missing:  # checked on every rank alike, so no rank waits in a collective for a failed one
            raise FileNotFoundError(f"{self.dir / missing[0]}: rank file missing from the checkpoint "
                                    f"({len(missing)} of {len(file_specs(self.lm, self.parallel))} missing)")

    def _open(self, spec: FileSpec):
        """Open one rank file (use as a context manager: it is unmapped on exit)."""
        path = self.dir / spec.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: rank file missing from the checkpoint")
        return open_safetensors(path)

    def full_tensor(self, name: str) -> torch.Tensor:
        """Reassemble one full megatron tensor from the rank files that hold its pieces."""
        p, expert = self.parallel, is_expert_param(name)
        for spec in file_specs(self.lm, p):
            if spec.kind != ("experts" if expert else "dense") or spec.tp or spec.etp:
                continue
            layout = spec.layout(self.lm, p)
            local = local_name(name, layout)
            if local is None:
                continue
            dim = partition_dim_of(name)
            size = p.expert_tp if expert else p.tp
            pieces = []
            for rank in range(size if dim is not None else 1):
                other = FileSpec(spec.kind, spec.pp, tp=0 if expert else rank, ep=spec.ep,
                                 etp=rank if expert else 0)
                with self._open(other) as handle:
                    pieces.append(handle.get_tensor(local).clone())
            return merge_shards(pieces, dim, gated=name.endswith("linear_fc1.weight"))
        raise KeyError(f"{name!r} is in no rank file of {self.dir}")


def mcore_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 2 << 30) -> Path:
    ckpt = McoreCheckpoint(ckpt_dir)
    rules = ckpt.family.hf_rules(ckpt.hf_config)
    writer = ShardedWriter(out_dir, max_shard_bytes)
    start = time.time()
    try:
        for done, rule in enumerate(rules, start=1):
            for name, tensor in zip(rule.hf, rule.to_hf([ckpt.full_tensor(n) for n in rule.mcore])):
                writer.add(name, tensor)
            if done % max(1, len(rules) // 10) == 0 or done == len(rules):
                print(f"[mcore-to-hf] {done}/{len(rules)} rules, {time.time() - start:.1f}s",
                      file=sys.stderr, flush=True)
        return writer.finish(config_json=ckpt.hf_config.to_dict(), side_files_from=ckpt.dir / "hf")
    except BaseException:
        writer.abort()
        raise


# --- a live model ----------------------------------------------------------------------------------
def checkpoint_kind(directory: str | Path, field: str = "vlm.init_from") -> str:
    """'mcore' (`megatron-vlm convert hf-to-mcore` output) or 'hf' (a Hugging Face checkpoint
    directory), from the files in `directory`; `field` names the setting in the error."""
    path = Path(directory)
    if (path / META).is_file():
        return "mcore"
    if (path / "config.json").is_file() and ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return "hf"
    if not path.is_dir():
        raise FileNotFoundError(f"{field}: {path} does not exist")
    raise FileNotFoundError(f"{field}: {path} is neither a Hugging Face checkpoint (config.json with "
                            f"{SINGLE} or {INDEX}) nor a megatron_vlm checkpoint ({META}, written "
                            f"by `megatron-vlm convert hf-to-mcore`)")


def load_weights(model: torch.nn.Module, directory: str, family, hf_config,
                 field: str = "vlm.init_from") -> str:
    """Load this rank's weights from either kind of checkpoint; returns what was read, for the log."""
    kind = checkpoint_kind(directory, field)
    if kind == "mcore":
        ckpt = McoreCheckpoint(directory)
        if ckpt.family.architecture != family.architecture:
            raise ValueError(f"{field}: {directory} holds a {ckpt.family.architecture}, the run builds "
                             f"a {family.architecture}")
        load_into_model(model, directory)
        return f"megatron_vlm checkpoint {directory} (this rank's files)"
    reader = HFCheckpointReader(directory)
    check_hf_source(family, hf_config, reader)
    load_hf_into_model(model, reader, family.hf_rules(hf_config), family.language_config(hf_config))
    return (f"HF checkpoint {directory}: this rank read {reader.bytes_read / 2**20:.1f} of "
            f"{reader.total_bytes() / 2**20:.1f} MiB")


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, reader: HFCheckpointReader, rules, lm) -> None:
    """Copy this rank's parameters from an HF checkpoint, reading only this rank's slice of each
    tensor (`_read_local`); the same values as converting the full tensors and cutting them."""
    layout = RankLayout.current(model.config)
    wanted = _local_params(model, layout, lm.tie_word_embeddings)
    for rule in rules:
        names = [n for n in rule.mcore if n in wanted]
        if not names:
            continue  # another pipeline stage's or expert-parallel rank's tensors: not read
        for name, piece in _read_local(rule, names, reader, layout, lm, wanted).items():
            for local, param, _ in wanted.pop(name):
                if piece.shape != param.shape:
                    raise ValueError(f"{reader.dir}: tensor {name!r} gives shape {list(piece.shape)} "
                                     f"on this rank, the model expects {list(param.shape)} for {local}")
                param.copy_(piece)
    if wanted:
        raise KeyError(f"{reader.dir}: no rule provides {sorted(wanted)[:3]} ({len(wanted)} parameters)")


def _local_params(model, layout: RankLayout, tied_embeddings: bool) -> dict[str, list]:
    """Full-model (TP=PP=EP=1) name -> [(local name, parameter, split dim)] of this rank."""
    wanted: dict[str, list] = {}
    for name, param in model.named_parameters():
        canonical = canonical_name(name)
        key = global_name(canonical, layout)
        if tied_embeddings and key.endswith("output_layer.weight"):  # PP > 1: the last stage's copy
            key = key.replace("output_layer.weight", "embedding.word_embeddings.weight")
        dim = split_dim(canonical, param)
        if dim != partition_dim_of(key):
            raise AssertionError(f"{name}: megatron splits it along {dim}, the conversion table "
                                 f"says {partition_dim_of(key)}")
        wanted.setdefault(key, []).append((name, param, dim))
    return wanted


def _tp(name: str, layout: RankLayout) -> tuple[int, int]:
    """(rank, size) of the group `name` is split over: expert TP for experts, else TP."""
    if is_expert_param(name):
        return layout.etp_rank, layout.etp_size
    return layout.tp_rank, layout.tp_size


def _rows(length: int, rank: int, size: int, name: str) -> slice:
    """This rank's contiguous range of `length` rows split `size` ways (as torch.chunk cuts it)."""
    if length % size:
        raise ValueError(f"tensor {name!r}: {length} rows do not split evenly over {size} ranks")
    return slice(rank * length // size, (rank + 1) * length // size)


def _along(dim: int, rows: slice) -> tuple[slice, ...]:
    return (slice(None),) * dim + (rows,)


def _read_local(rule, names, reader, layout, lm, wanted) -> dict[str, torch.Tensor]:
    """This rank's pieces of the megatron tensors `names` of `rule`, reading only their slices.

    Rules are recognised by their shape (hf_rules.py): one tensor to one (`same`: slice it along
    the split dim), gate + up to fc1 (each sliced, then stacked), q, k, v to grouped QKV (this
    rank's query groups of each), one fused [E, ...] tensor to E experts (this rank's experts, its
    expert-TP piece). Any other rule, or a tensor of an unexpected shape, is read in full and cut."""
    dims = {n: wanted[n][0][2] for n in names}
    full_shape = {n: _full_shape(wanted[n][0][1].shape, dims[n], _tp(n, layout)[1]) for n in names}
    shapes = [reader.shape(h) for h in rule.hf]
    name = names[0]
    rank, size = _tp(name, layout) if dims[name] is not None else (0, 1)
    if len(rule.hf) == 1 and len(rule.mcore) == 1 and shapes[0] == full_shape[name]:  # same
        if dims[name] is None:
            return {name: reader.get(rule.hf[0])}
        index = _along(dims[name], _rows(shapes[0][dims[name]], rank, size, rule.hf[0]))
        return {name: reader.get_slice(rule.hf[0], index)}
    if (len(rule.hf) == 2 and len(rule.mcore) == 1 and name.endswith("linear_fc1.weight")
            and dims[name] in (0, None) and shapes[0] == shapes[1]
            and (2 * shapes[0][0], *shapes[0][1:]) == full_shape[name]):  # gate_up
        rows = _rows(shapes[0][0], rank, size, rule.hf[0])
        return {name: rule.to_mcore([reader.get_slice(h, (rows,)) for h in rule.hf])[0]}
    if (len(rule.hf) == 3 and len(rule.mcore) == 1 and ".linear_qkv." in name
            and dims[name] in (0, None)):
        pieces = _read_qkv(rule, name, reader, rank, size, lm, shapes, full_shape[name])
        if pieces is not None:
            return {name: pieces}
    if len(rule.hf) == 1 and len(rule.mcore) > 1 and all(is_expert_param(n) for n in names):
        pieces = _read_experts(rule, names, dims, reader, layout, shapes[0], full_shape[name])
        if pieces is not None:
            return pieces
    full = rule.to_mcore([reader.get(h) for h in rule.hf])
    return {n: shard_tensor(full[rule.mcore.index(n)], canonical_name(wanted[n][0][0]), dims[n],
                            layout).clone() for n in names}


def _full_shape(local: torch.Size, dim: int | None, size: int) -> tuple[int, ...]:
    shape = list(local)
    if dim is not None:
        shape[dim] *= size
    return tuple(shape)


def _read_qkv(rule, name, reader, rank, size, lm, shapes, full_shape):
    """This rank's query groups of q, k and v, stacked as the `qkv` rule stacks the full ones."""
    groups, head_dim = lm.num_query_groups, lm.head_dim
    per_group = lm.num_attention_heads // groups
    rest = shapes[0][1:]
    if (shapes != [(groups * per_group * head_dim, *rest), (groups * head_dim, *rest),
                   (groups * head_dim, *rest)]
            or full_shape != (groups * (per_group + 2) * head_dim, *rest)):
        return None
    mine = _rows(groups, rank, size, name)
    local_groups = mine.stop - mine.start
    q = reader.get_slice(rule.hf[0], (slice(mine.start * per_group * head_dim,
                                            mine.stop * per_group * head_dim),))
    k, v = (reader.get_slice(h, (slice(mine.start * head_dim, mine.stop * head_dim),))
            for h in rule.hf[1:])
    local = qkv(*rule.hf, name, local_groups * per_group, local_groups, head_dim)
    return local.to_mcore([q, k, v])[0]


def _read_experts(rule, names, dims, reader, layout, shape, expert_shape):
    """This rank's experts of a fused [E, in, out] (Hub) or [E, out, in] tensor, each cut for
    expert TP; the layout is told apart by shape as the `fused_experts` rule tells it."""
    positions = [rule.mcore.index(n) for n in names]  # expert ids, in order
    first, last = positions[0], positions[-1]
    out_features, in_features = expert_shape
    if (positions != list(range(first, last + 1)) or len(shape) != 3
            or shape[0] != len(rule.mcore)):
        return None
    if shape[1:] == (in_features, out_features):
        hub = True
    elif shape[1:] == (out_features, in_features):
        hub = False
    else:
        return None
    dim, experts = dims[names[0]], slice(first, last + 1)
    rank, size = _tp(names[0], layout)
    if dim is None or size == 1:
        fused = reader.get_slice(rule.hf[0], (experts,))
    else:
        file_dim = 1 + (1 - dim if hub else dim)  # the expert's [out, in] dim in the file
        length = shape[file_dim]
        gated = layout.gated_linear_unit and names[0].endswith("linear_fc1.weight")
        halves = [slice(0, length // 2), slice(length // 2, length)] if gated else [slice(0, length)]
        pieces = []
        for half in halves:
            rows = _rows(half.stop - half.start, rank, size, rule.hf[0])
            index = (experts,) + _along(file_dim - 1, slice(half.start + rows.start, half.start + rows.stop))
            pieces.append(reader.get_slice(rule.hf[0], index))
        fused = torch.cat(pieces, dim=file_dim)
    if hub:
        fused = fused.transpose(1, 2)
    return {n: e.contiguous() for n, e in zip(names, fused.unbind(0))}


def load_into_model(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Copy this rank's tensors from a megatron_vlm checkpoint of the same layout into `model`."""
    from megatron.core import parallel_state as ps

    ckpt = McoreCheckpoint(ckpt_dir)
    here = {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size()}
    if here != ckpt.meta["layout"]:
        raise ValueError(f"{ckpt_dir} was written for layout {ckpt.meta['layout']}, this run uses "
                         f"{here}; convert it with `megatron-vlm convert` (via HF) first")
    pp = ps.get_pipeline_model_parallel_rank()
    files = {False: FileSpec("dense", pp, tp=ps.get_tensor_model_parallel_rank())}
    if ckpt.lm.num_experts:
        files[True] = FileSpec("experts", pp, ep=ps.get_expert_model_parallel_rank(),
                               etp=ps.get_expert_tensor_parallel_rank())
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for expert, spec in files.items():
            with ckpt._open(spec) as source:
                for name, param in params.items():
                    if is_expert_param(name) != expert:
                        continue
                    if name not in source.keys():
                        raise KeyError(f"{ckpt_dir}/{spec.name}: no tensor {name!r} for this rank")
                    tensor = source.get_tensor(name)
                    if tensor.shape != param.shape:
                        raise ValueError(f"{ckpt_dir}/{spec.name}: tensor {name!r} has shape "
                                         f"{list(tensor.shape)}, the model expects {list(param.shape)}")
                    param.copy_(tensor)


def export_model(model, rules, hf_config, out_dir: str, side_files_from: str | None = None,
                 max_shard_bytes: int = 2 << 30) -> Path | None:
    """Write a live sharded model as an HF checkpoint (every rank gathers, rank 0 writes)."""
    from megatron_vlm.checkpoint.streaming import iter_hf_weights

    writer = ShardedWriter(out_dir, max_shard_bytes) if torch.distributed.get_rank() == 0 else None
    try:
        for name, tensor in iter_hf_weights(model, rules):
            if writer is not None:
                writer.add(name, tensor)
        if writer is not None:
            return writer.finish(config_json=hf_config.to_dict(), side_files_from=side_files_from)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return None

