"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

Reader: validates the directory before anything is converted (config.json present, every shard the
index names exists and has a readable safetensors header — a truncated file fails here, naming it),
then hands out single tensors, or slices of them (`get_slice`: a rank's TP / EP piece, read without
the rest of the tensor), through `safe_open` (memory-mapped, nothing else loaded). `bytes_read`
counts what was handed out, so a caller can show it read only its share.

Writer: size-bounded safetensors shards named as transformers names them
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`), written into
`<out>.partial-<pid>` and renamed to `<out>` only after the index, config and tokenizer /
processor files are in place, so an interrupted export never leaves a directory that looks
complete. Peak memory: the current shard plus the tensor being added.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def open_safetensors(path: Path):
    """safe_open with an error that names the file (a truncated file fails at the header)."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: unreadable or truncated safetensors file ({exc})") from None


class HFCheckpointReader:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no config.json (not a Hugging Face checkpoint dir)")
        self.weight_map = self._weight_map()
        self.bytes_read = 0  # tensor bytes handed out by get / get_slice
        self._shapes = {}
        for file in sorted(set(self.weight_map.values())):
            path = self.dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing")
            with open_safetensors(path) as handle:
                listed = {k for k, f in self.weight_map.items() if f == file}
                missing = sorted(listed - set(handle.keys()))
                if missing:
                    raise ValueError(f"{path}: the index lists tensors the file does not contain, "
                                     f"e.g. {missing[:3]}")
                self._shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in listed})

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
        if (self.dir / SINGLE).is_file():
            try:
                with safe_open(str(self.dir / SINGLE), framework="pt") as f:
                    return {k: SINGLE for k in f.keys()}
            except SafetensorError as exc:
                raise ValueError(f"{self.dir / SINGLE}: unreadable or truncated ({exc})") from None
        raise FileNotFoundError(f"{self.dir}: neither {INDEX} nor {SINGLE} found")

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its file; the file is unmapped again right away, so pages
        of tensors already converted do not stay resident."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        with open_safetensors(self.dir / self.weight_map[name]) as handle:
            return self._count(handle.get_tensor(name).clone())

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """`tensor[index]` (one slice per leading dim), reading only those elements from the file."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor {name!r}")
        with open_safetensors(self.dir / self.weight_map[name]) as handle:
            return self._count(handle.get_slice(name)[index].clone())

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.dir))

    def total_bytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.weight_map.values()))


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, processor, chat template, generation config: every non-weight file but config.json."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


class ShardedWriter:
    """Add tensors one at a time; shards close at `max_shard_bytes` (a larger tensor goes alone)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30, prefix: str = "model"):
        self.out = Path(out_dir)
        if self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} exists and is not empty; choose a new --out")
        self.tmp = self.out.parent / f"{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.max_bytes, self.prefix = max_shard_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        number = len(self.shards) + 1
        save_file(self.pending, str(self.tmp / f"{self.prefix}-{number:05d}.safetensors"),
                  metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config_json: dict | None = None, side_files_from: Path | None = None) -> Path:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for number, names in enumerate(self.shards, start=1):
            final = f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp / f"{self.prefix}-{number:05d}.safetensors", self.tmp / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if side_files_from is not None:
            copy_side_files(Path(side_files_from), self.tmp)
        if config_json is not None:
            (self.tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
