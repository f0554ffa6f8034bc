"""scope-megatron: on-policy distillation of reasoning LLMs with SCOPE on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="scope-megatron",
    version="0.1.0",
    description="Megatron-scale trainer for on-policy distillation with the SCOPE method",
    python_requires=">=3.12",
    packages=find_packages(include=["scope_megatron", "scope_megatron.*", "checkpoints_tools", "checkpoints_tools.*"]),
    install_requires=[
        # Tested range: the CPU shims in scope_megatron/cpu_shims.py were checked against 0.19.x.
        "megatron-core>=0.19.0,<0.20",
        # PyPI's default torch wheel is built for CUDA 13.0 and needs an NVIDIA driver R580 or newer.
        # With an older driver install a CUDA 12 build first, e.g.
        #   pip install torch --index-url https://download.pytorch.org/whl/cu128   (or cu126)
        # (CUDA 12.x wheels run on drivers R525.60.13+; Blackwell GPUs need cu128 and R570+), or
        # use an NGC PyTorch container. A mismatch is refused at start-up
        # (scope_megatron/device_check.py), never silently run on CPU.
        "torch>=2.6",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tensorboard>=2.16",
        "math-verify[antlr4_13_2]>=0.7",
        "numpy",
        "psutil",  # megatron's async checkpoint writer needs it
        "pyyaml",
        "tqdm",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "pyarrow",  # parquet prompt data
        "matplotlib",  # the demo's accuracy plot
    ],
    extras_require={
        # Transformer Engine for megatron-core 0.19: megatron's own extra is
        # transformer-engine[core_cu13,pytorch] (megatron_core-0.19.2.dist-info/METADATA: "te" extra,
        # no version bound); >= 2.2 so that megatron forwards pad_between_seqs
        # (megatron/core/extensions/transformer_engine.py:1944-1945); < 3 until a major release is
        # checked. "gpu" matches PyPI's CUDA 13 torch, "gpu-cu12" a CUDA 12 torch build. The
        # transformer_engine_torch extension is built against the installed torch (needs nvcc and
        # cuDNN headers); NGC PyTorch containers ship a matching TE (and apex).
        "gpu": ["transformer-engine[core_cu13,pytorch]>=2.2,<3"],
        "gpu-cu12": ["transformer-engine[core_cu12,pytorch]>=2.2,<3"],
        "sglang": ["sglang", "sglang-router"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "msgspec"],
        # logging.wandb: Weights & Biases runs (checked with 0.31; the offline .wandb file is read
        # back in tests/test_metrics_sinks.py)
        "wandb": ["wandb>=0.19"],
    },
    entry_points={"console_scripts": ["scope-megatron=scope_megatron.cli:main"]},
)
