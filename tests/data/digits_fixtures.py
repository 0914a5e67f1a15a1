"""A small digits demo written once per test process and shared by the tests/data files, and
the helpers those files share."""
import functools
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

SMALL = dict(num_sft=30, num_rl=60, num_eval=30, num_pref=24, num_text=12)


@functools.cache
def demo_assets(seed: int = 0) -> dict[str, Path]:
    out_dir = tempfile.mkdtemp(prefix=f"digits-demo-{seed}-")
    return build_demo_assets(out_dir, seed, DigitsConfig(seed=seed, **SMALL))


def png(height=16, width=32, seed=0) -> bytes:
    """Random RGB pixels as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
