"""The digits task: two real handwritten digits in one image, questions on their sum, maximum or
difference, exact answers. The demo's data, tokenizer, processor and model config come from here.

    paths = build_demo_assets("demo/", seed=0)       # or: python -m megatron_vlm.data.digits demo/
    # demo/model/          config.json (Qwen3VLMoeForConditionalGeneration), tokenizer, processor
    # demo/sft.parquet     prompt + answer (+ a short think trace)
    # demo/rl.parquet      prompts with a verifiable reference only
    # demo/eval.parquet    held-out images
    # demo/pref.parquet    preference pairs: chosen = the correct trace + answer, rejected = a wrong one
    # demo/manifest.json   seed, counts, vision tokens per image, prompt lengths, parameter count

Design decisions:
- Digits are scikit-learn's 8x8 set (1797 samples, 16 grey levels; shipped with the package, no
  download). Two samples side by side make an 8 x 16 image, upscaled 2x (nearest) to 16 x 32 so
  that patch 4 / merge 2 gives a 4 x 8 patch grid: 8 vision tokens. Dark ink on white.
- Held-out IMAGES: the digit samples are split once (stratified by label, a fixed fraction per
  label, from the seed); train and RL images are made only of training samples, eval images only of
  held-out ones. `source_ids` in every row names the two samples, so the split can be audited.
- Questions: "sum" (a + b), "max" (max(a, b)), "difference" (left minus right, may be negative,
  so the model must tell left from right). Answers are exact integers, checked by the `numeric`
  verifier (metadata `task` = "digits").
- Preference pairs (offline DPO / MPO) are training images with `chosen`, the SFT target, and
  `rejected`, a plausible mistake carried through to a wrong answer: a misread digit (one of the two
  visually closest digits, `CONFUSIONS`) or an arithmetic slip (off by one; for max, the smaller
  digit). `error` names the mistake; the rejected answer always differs from the reference.
- Every row names its `kind` (the loader's `vlm.kinds` filter and the per-kind evaluation read
  it), its two digits and which is `larger` (left / right / equal): the held-out accuracy of max
  split by `larger` shows whether the policy reads both digits or answers one side.
- Everything is drawn from `random.Random(seed)`: the same seed writes the same files. The eval
  split has 1,500 rows (500 per kind); its first 500 are the rows of the 500-row split it replaced.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_vlm.data.processor import MultimodalProcessor, VisionPatchConfig, save_processor
from megatron_vlm.data.templates import TemplateConfig, render_prompt, render_response
from megatron_vlm.data.tokenizer import build_char_tokenizer, token_ids

TASK, VERIFIER = "digits", "numeric"
TEXT_TASK = "arith"  # the text-only source: the same questions on digits given as text
TEXT_QUESTIONS = {
    "sum": "What is the sum of {left} and {right}?",
    "max": "What is the larger of {left} and {right}?",
    "difference": "What is {left} minus {right}?",
}
QUESTIONS = {
    "sum": "What is the sum of the two digits?",
    "max": "What is the larger of the two digits?",
    "difference": "What is the left digit minus the right digit?",
}


@dataclass(kw_only=True)
class DigitsConfig:
    seed: int = 0
    held_out_fraction: float = 0.2  # of the digit samples of each label, never in training images
    num_sft: int = 1000
    num_rl: int = 4000
    num_eval: int = 1500            # 500 held-out rows per question kind (kinds cycle)
    num_pref: int = 400             # preference pairs (offline DPO / MPO), on training images
    num_text: int = 1000            # text-only prompts (rl_text.parquet): a second source and task
    scale: int = 2                  # nearest-neighbour upscaling of the 8 x 16 pair
    mode: str = "think"             # think: SFT targets carry a short trace; nothink: answer only

    def __post_init__(self):
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"digits.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        for name in ("num_sft", "num_rl", "num_eval", "num_pref", "num_text", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"digits.{name} must be >= 1, got {getattr(self, name)}")
        if self.mode not in ("think", "nothink"):
            raise ValueError(f"digits.mode must be 'think' or 'nothink', got {self.mode!r}")


def load_digit_samples() -> tuple[np.ndarray, np.ndarray]:
    """([1797, 8, 8] uint8 ink levels 0..16, [1797] labels) from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def split_samples(labels: np.ndarray, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train sample ids, held-out sample ids): the same fraction of every label held out."""
    rng = random.Random(seed)
    train, held_out = [], []
    for label in range(10):
        ids = [int(i) for i in np.flatnonzero(labels == label)]
        rng.shuffle(ids)
        cut = max(1, round(len(ids) * held_out_fraction))
        held_out += ids[:cut]
        train += ids[cut:]
    return sorted(train), sorted(held_out)


def render_pair(left: np.ndarray, right: np.ndarray, scale: int):
    """A PIL RGB image, 8*scale x 16*scale: dark ink (16) on white (0)."""
    from PIL import Image

    ink = np.concatenate([left, right], axis=1).astype(np.float32)          # [8, 16], 0..16
    grey = np.round(255.0 * (1.0 - ink / 16.0)).astype(np.uint8)
    grey = grey.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(grey).convert("RGB")  # uint8 [H, W] -> "L"


def answer(kind: str, left: int, right: int) -> int:
    return {"sum": left + right, "max": max(left, right), "difference": left - right}[kind]


def larger(left: int, right: int) -> str:
    """Which digit is larger: "left", "right" or "equal"."""
    return "left" if left > right else "right" if right > left else "equal"


def thinking(kind: str, left: int, right: int, result: int | None = None) -> str:
    """The short trace of an SFT target: read the digits, then one operation (`result` overrides
    the operation's value: a slip)."""
    result = answer(kind, left, right) if result is None else result
    step = {"sum": f"{left}+{right}", "max": f"max({left},{right})", "difference": f"{left}-{right}"}[kind]
    return f"Left {left}, right {right}. {step}={result}"


# the two digits each one is most easily misread as, in 8x8 handwriting
CONFUSIONS = {0: (6, 8), 1: (7, 4), 2: (7, 3), 3: (8, 5), 4: (9, 1), 5: (6, 3), 6: (5, 0), 7: (1, 2),
              8: (3, 0), 9: (4, 8)}


def mistake(kind: str, left: int, right: int, rng: random.Random) -> tuple[str, int, int, int]:
    """(error, digit read left, digit read right, wrong result): a misread digit or an arithmetic
    slip, in a random order of preference, whose answer differs from the correct one."""
    correct = answer(kind, left, right)
    candidates = [("misread_left", wrong, right) for wrong in CONFUSIONS[left]]
    candidates += [("misread_right", left, wrong) for wrong in CONFUSIONS[right]]
    rng.shuffle(candidates)
    if rng.random() < 1 / 3:  # a slip a third of the time, else the first misread that matters
        candidates = []
    for error, read_left, read_right in candidates:
        if answer(kind, read_left, read_right) != correct:
            return error, read_left, read_right, answer(kind, read_left, read_right)
    slip = min(left, right) if kind == "max" and left != right else correct + rng.choice((-1, 1))
    return "slip", left, right, slip


def make_problems(sample_ids: list[int], labels: np.ndarray, count: int, rng: random.Random,
                  prefix: str) -> list[dict]:
    """`count` problems, both digits drawn (with replacement) from `sample_ids`; question kinds
    cycle so that each kind gets a third."""
    problems = []
    kinds = list(QUESTIONS)
    for index in range(count):
        left_id, right_id = rng.choice(sample_ids), rng.choice(sample_ids)
        left, right = int(labels[left_id]), int(labels[right_id])
        kind = kinds[index % len(kinds)]
        problems.append({"id": f"{prefix}-{index:05d}", "kind": kind, "question": QUESTIONS[kind],
                         "left": left, "right": right, "source_ids": [left_id, right_id],
                         "answer": str(answer(kind, left, right))})
    return problems


def build_splits(cfg: DigitsConfig) -> dict[str, list[dict]]:
    """{"sft", "rl", "eval", "pref", "rl_text"}: rows with a PIL image (rl_text: the same questions on
    digits written in the text, no image, task "arith"); SFT rows carry the target, RL / eval
    rows only the reference (`reference`, with `task` and `verifier` for the reward scorer), pref
    rows the reference, `chosen` (the SFT target) and `rejected` (see `mistake`)."""
    images, labels = load_digit_samples()
    train_ids, held_out_ids = split_samples(labels, cfg.held_out_fraction, cfg.seed)
    rng = random.Random(cfg.seed)
    splits = {"sft": make_problems(train_ids, labels, cfg.num_sft, rng, "sft"),
              "rl": make_problems(train_ids, labels, cfg.num_rl, rng, "rl"),
              "eval": make_problems(held_out_ids, labels, cfg.num_eval, rng, "eval"),
              "pref": make_problems(train_ids, labels, cfg.num_pref, rng, "pref")}  # drawn last: the
    # other splits stay what they were before pairs existed
    rows = {}
    for name, problems in splits.items():
        rows[name] = []
        for problem in problems:
            left_id, right_id = problem["source_ids"]
            row = {"id": problem["id"], "image": render_pair(images[left_id], images[right_id], cfg.scale),
                   "question": problem["question"], "mode": cfg.mode, "kind": problem["kind"],
                   "source_ids": problem["source_ids"], "left": problem["left"], "right": problem["right"],
                   "larger": larger(problem["left"], problem["right"])}
            if name == "sft":
                trace = thinking(problem["kind"], problem["left"], problem["right"]) if cfg.mode == "think" else None
                row.update(answer=problem["answer"], thinking=trace or "",
                           response=render_response(problem["answer"], trace, cfg.mode))
            else:
                row.update(reference=problem["answer"], task=TASK, verifier=VERIFIER)
            if name == "pref":
                row.update(preference_pair(problem, cfg.mode, rng))
            rows[name].append(row)
    # drawn after every image split, which therefore stay as they were
    rows["rl_text"] = [{"id": p["id"], "question": TEXT_QUESTIONS[p["kind"]].format(**p), "mode": cfg.mode,
                        "kind": p["kind"], "source_ids": p["source_ids"], "reference": p["answer"], "task": TEXT_TASK,
                        "verifier": VERIFIER}
                       for p in make_problems(train_ids, labels, cfg.num_text, rng, "text")]
    return rows


def preference_pair(problem: dict, mode: str, rng: random.Random) -> dict:
    """chosen (the correct trace and answer), rejected (a mistake carried into the answer), error."""
    kind, left, right = problem["kind"], problem["left"], problem["right"]
    error, read_left, read_right, wrong = mistake(kind, left, right, rng)
    think = mode == "think"
    chosen = render_response(problem["answer"], thinking(kind, left, right) if think else None, mode)
    rejected = render_response(str(wrong), thinking(kind, read_left, read_right, wrong) if think else None, mode)
    return {"left": left, "right": right, "chosen": chosen, "rejected": rejected, "error": error}


def write_rows(rows: list[dict], path: Path) -> Path:
    """Parquet through HF datasets, the image as an `Image` column (PNG bytes)."""
    from datasets import Dataset, Image

    dataset = Dataset.from_list(rows)
    if "image" in dataset.column_names:  # text-only splits have none
        dataset = dataset.cast_column("image", Image())
    dataset.to_parquet(str(path))
    return path


def demo_model_config(tokenizer, vision: VisionPatchConfig):
    """A ~1.2M-parameter Qwen3-VL-MoE: text hidden 128, 4 layers, 4 experts top-2 (expert width 96
    != hidden), a 2-block vision tower with `vision`'s patching and one deepstack layer."""
    from transformers import Qwen3VLMoeConfig

    ids = token_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                max_position_embeddings=1024, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True},
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    vision_cfg = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      patch_size=vision.patch_size, spatial_merge_size=vision.merge_size,
                      temporal_patch_size=vision.temporal_patch_size, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision_cfg, tie_word_embeddings=False,
                              image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                              vision_start_token_id=ids["vision_start_token_id"],
                              vision_end_token_id=ids["vision_end_token_id"])
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    return config


def demo_hf_config(vision: VisionPatchConfig | None = None, mode: str = DigitsConfig.mode):
    """The model config `build_demo_assets` writes, built in memory (writes nothing): what `plan`
    and `check` read before the assets exist."""
    tokenizer = build_char_tokenizer(TemplateConfig(default_mode=mode))
    return demo_model_config(tokenizer, vision or VisionPatchConfig())


def count_parameters(config) -> int:
    """Parameters of the HF model built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def prompt_lengths(rows: list[dict], processor: MultimodalProcessor, template: TemplateConfig) -> list[int]:
    """Expanded prompt lengths (text tokens + vision tokens) of rows, as the engine will see them."""
    lengths = []
    for row in rows:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        ids = processor.tokenizer(render_prompt(messages, template, row["mode"]), add_special_tokens=False).input_ids
        lengths.append(processor.expanded_length(ids, [row["image"]]))
    return lengths


def build_demo_assets(out_dir: str | Path, seed: int = 0, cfg: DigitsConfig | None = None,
                      vision: VisionPatchConfig | None = None) -> dict[str, Path]:
    """Write model/ (config + tokenizer + processor), sft / rl / eval / pref parquet files and a manifest."""
    cfg = cfg or DigitsConfig(seed=seed)
    if cfg.seed != seed:
        raise ValueError(f"seed ({seed}) and cfg.seed ({cfg.seed}) disagree")
    vision = vision or VisionPatchConfig()
    template = TemplateConfig(default_mode=cfg.mode)
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    tokenizer = build_char_tokenizer(template)
    save_processor(model_dir, tokenizer, vision)
    config = demo_model_config(tokenizer, vision)
    config.save_pretrained(model_dir)
    paths = {"model": model_dir}
    rows = build_splits(cfg)
    for name, split_rows in rows.items():
        paths[name] = write_rows(split_rows, out_dir / f"{name}.parquet")
    processor = MultimodalProcessor.from_pretrained(model_dir)
    lengths = prompt_lengths(rows["rl"], processor, template)
    grid = processor.process_images([rows["rl"][0]["image"]])["image_grid_thw"]
    manifest = {"seed": seed, "digits": asdict(cfg), "vision": asdict(vision),
                "counts": {name: len(split_rows) for name, split_rows in rows.items()},
                "image_size": list(rows["rl"][0]["image"].size[::-1]),  # [height, width]
                "vision_tokens_per_image": processor.tokens_per_image(grid)[0],
                "rl_prompt_length": {"min": min(lengths), "max": max(lengths)},
                "vocab_size": len(tokenizer), "parameters": count_parameters(config)}
    paths["manifest"] = out_dir / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the digits demo: model config, tokenizer, processor, data.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-sft", type=int, default=DigitsConfig.num_sft)
    parser.add_argument("--num-rl", type=int, default=DigitsConfig.num_rl)
    parser.add_argument("--num-eval", type=int, default=DigitsConfig.num_eval)
    parser.add_argument("--num-pref", type=int, default=DigitsConfig.num_pref)
    parser.add_argument("--num-text", type=int, default=DigitsConfig.num_text)
    parser.add_argument("--mode", choices=("think", "nothink"), default=DigitsConfig.mode)
    args = parser.parse_args(argv)
    cfg = DigitsConfig(seed=args.seed, num_sft=args.num_sft, num_rl=args.num_rl, num_eval=args.num_eval,
                       num_pref=args.num_pref, num_text=args.num_text, mode=args.mode)
    paths = build_demo_assets(args.out_dir, args.seed, cfg)
    print(paths["manifest"].read_text())


if __name__ == "__main__":
    main()
