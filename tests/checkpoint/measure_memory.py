"""Peak memory of streaming conversion on a model several times larger than one shard (a script).

  python tests/checkpoint/measure_memory.py WORKDIR
writes a ~0.8 GB random Qwen3-VL-MoE in the Hub layout with 100 MB shards, then runs both
conversions under /usr/bin/time -v and prints peak RSS next to the model, shard and largest-tensor
sizes and the RSS of a process that only imports the same libraries.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build(work: Path) -> Path:
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from tests.checkpoint.test_convert import write_hub_checkpoint

    text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, moe_intermediate_size=256,
                num_experts=32, num_experts_per_tok=4,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [8, 12, 12], "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=256, deepstack_visual_indexes=[1, 2])
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=31990,
                           video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)
    cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(cfg)
    return write_hub_checkpoint(model, work / "hub", max_shard_bytes=100 << 20)


def peak_rss_mb(cmd: list[str]) -> float:
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024


def main():
    work = Path(sys.argv[1])
    hub = build(work)
    index = json.loads((hub / "model.safetensors.index.json").read_text())
    files = {f: (hub / f).stat().st_size for f in set(index["weight_map"].values())}
    model_mb = sum(files.values()) / 2**20
    cli = [sys.executable, "-m", "megatron_vlm.cli", "convert"]
    # Baseline: the same imports, config and rule construction, no tensor data.
    imports = peak_rss_mb([sys.executable, "-c",
                           "import sys; from megatron_vlm.checkpoint.hf_io import HFCheckpointReader;"
                           "from megatron_vlm.models import family_for;"
                           "r = HFCheckpointReader(sys.argv[1]); c = r.config(); family_for(c).hf_rules(c)",
                           str(hub)])
    to_mcore = peak_rss_mb(cli + ["hf-to-mcore", "--hf", str(hub), "--out", str(work / "mc"),
                                  "--tp", "2", "--pp", "2", "--ep", "2", "--etp", "1"])
    rank_files = {p.name: p.stat().st_size / 2**20 for p in (work / "mc").glob("*.safetensors")}
    to_hf = peak_rss_mb(cli + ["mcore-to-hf", "--ckpt", str(work / "mc"), "--out", str(work / "back"),
                               "--max-shard-gb", str(100 / 1024)])
    largest = 32 * 512 * 512 * 4 / 2**20  # one layer's fused gate_up_proj, fp32
    print(f"model {model_mb:.0f} MB in {len(files)} HF shards (largest {max(files.values()) / 2**20:.0f} MB);"
          f" largest tensor {largest:.0f} MB; largest rank file {max(rank_files.values()):.0f} MB")
    print(f"peak RSS: baseline (imports, config, rules) {imports:.0f} MB | hf-to-mcore "
          f"{to_mcore:.0f} MB (+{to_mcore - imports:.0f}) | mcore-to-hf {to_hf:.0f} MB "
          f"(+{to_hf - imports:.0f})")


if __name__ == "__main__":
    main()
