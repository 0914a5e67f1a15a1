"""The Qwen3-VL processor for tiny images, saved in HF format, and the wrapper the engines call.

    save_processor(out_dir, tokenizer, VisionPatchConfig())      # AutoProcessor.from_pretrained(out_dir)
    mm = MultimodalProcessor.from_pretrained(out_dir)
    inputs = mm(request.prompt_ids, request.images)              # what the HF / Megatron forward needs

Design decisions:
- The directory is the family's own format: `Qwen3VLProcessor` (processor_config.json) over the
  tokenizer files, a `Qwen2VLImageProcessor` (preprocessor_config.json) and a
  `Qwen3VLVideoProcessor` (video_preprocessor_config.json) with the same tiny patching, so vLLM and
  `AutoProcessor` read it unchanged. transformers cannot build `Qwen3VLProcessor` or its video
  processor without torchvision, which the CPU machines lack, so the files are written from the
  sub-processors' own `save_pretrained` plus two small JSON files, and the wrapper uses only the
  tokenizer and the image processor (both load without torchvision). A test checks the wrapper
  against `Qwen3VLProcessor` wherever torchvision is installed.
- Prompts arrive as token ids with ONE `<|image_pad|>` per image (rollout protocol). The wrapper
  expands each to `t * h * w / merge_size**2` copies, the number of tokens the vision tower's
  merger emits for that image's grid, and marks them in `mm_token_type_ids` (0 text, 1 image).
- Images: `shortest_edge` / `longest_edge` bound the pixel count (the HF names for min / max
  pixels); each side is rounded to a multiple of patch_size * merge_size. A 16 x 32 digit pair is
  a 4 x 8 patch grid: 8 vision tokens.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


@dataclass(kw_only=True)
class VisionPatchConfig:
    patch_size: int = 4            # pixels per patch side (Qwen3-VL: 16)
    merge_size: int = 2            # merge_size x merge_size patches -> one LLM token
    temporal_patch_size: int = 2   # a still image is repeated to fill the temporal patch
    min_pixels: int = 16 * 16      # smaller images are scaled up to this many pixels (4 tokens)
    max_pixels: int = 64 * 64      # larger ones scaled down (at most 64 tokens)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"vision.{name} must be >= 1, got {getattr(self, name)}")
        unit = (self.patch_size * self.merge_size) ** 2
        if not unit <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"vision.min_pixels / max_pixels must satisfy {unit} <= min <= max, got "
                             f"{self.min_pixels} / {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Image sides are rounded to multiples of this."""
        return self.patch_size * self.merge_size


def build_image_processor(cfg: VisionPatchConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=cfg.temporal_patch_size,
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))


def save_processor(out_dir: str | Path, tokenizer, cfg: VisionPatchConfig) -> Path:
    """Tokenizer + image processor + video processor + processor_config.json in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    build_image_processor(cfg).save_pretrained(out_dir)
    image_cfg = json.loads((out_dir / "preprocessor_config.json").read_text())
    image_cfg["image_processor_type"] = "Qwen2VLImageProcessor"  # the torchvision class where available
    image_cfg["processor_class"] = "Qwen3VLProcessor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2) + "\n")
    video_cfg = {key: image_cfg[key] for key in ("patch_size", "merge_size", "temporal_patch_size", "size",
                                                 "image_mean", "image_std", "do_rescale", "rescale_factor",
                                                 "do_normalize", "do_resize", "do_convert_rgb")}
    video_cfg.update(video_processor_type="Qwen3VLVideoProcessor", processor_class="Qwen3VLProcessor")
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2) + "\n")
    (out_dir / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n")
    (out_dir / "vision_patch_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out_dir


class MultimodalProcessor:
    """(prompt ids with one image placeholder per image, PIL images) -> model inputs.

    Returns (batch of one): input_ids [1, T] (placeholders expanded), attention_mask [1, T],
    mm_token_type_ids [1, T] (0 text, 1 image), pixel_values [sum of t*h*w, 3*tp*p*p] and
    image_grid_thw [n_images, 3]; no pixel_values / image_grid_thw when there are no images.
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_size = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MultimodalProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))

    def process_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """pixel_values and image_grid_thw for PIL images (converted to RGB)."""
        out = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        return (image_grid_thw.prod(-1) // self.merge_size**2).tolist()

    def expand(self, prompt_ids: Sequence[int], image_grid_thw: torch.Tensor | None) -> list[int]:
        """Each placeholder -> as many placeholders as its image's merged grid has tokens."""
        counts = [] if image_grid_thw is None else self.tokens_per_image(image_grid_thw)
        placeholders = sum(1 for token in prompt_ids if token == self.image_token_id)
        if placeholders != len(counts):
            raise ValueError(f"prompt has {placeholders} image placeholders but {len(counts)} images")
        expanded, image = [], 0
        for token in prompt_ids:
            if token == self.image_token_id:
                expanded += [token] * counts[image]
                image += 1
            else:
                expanded.append(token)
        return expanded

    def __call__(self, prompt_ids: Sequence[int], images: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
        vision = self.process_images(images) if images else {}
        input_ids = torch.tensor([self.expand(prompt_ids, vision.get("image_grid_thw"))])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == self.image_token_id).long(), **vision}

    def expanded_length(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> int:
        """Length of the expanded prompt, from the images' sizes (no pixel processing)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size, patch = self.image_processor.size, self.image_processor.patch_size
        extra = 0
        for image in images:
            height, width = smart_resize(image.height, image.width, factor=patch * self.merge_size,
                                         min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
            extra += (height // patch) * (width // patch) // self.merge_size**2 - 1
        return len(prompt_ids) + extra
