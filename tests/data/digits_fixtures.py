"""A small digits demo written once per test process and shared by the tests/data files."""
import functools
import tempfile
from pathlib import Path

from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

SMALL = dict(num_sft=30, num_rl=60, num_eval=30, num_pref=24, num_text=12)


@functools.cache
def demo_assets(seed: int = 0) -> dict[str, Path]:
    out_dir = tempfile.mkdtemp(prefix=f"digits-demo-{seed}-")
    return build_demo_assets(out_dir, seed, DigitsConfig(seed=seed, **SMALL))
