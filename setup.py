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
        "gpu": ["transformer-engine[pytorch]"],
        "sglang": ["sglang", "sglang-router"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "msgspec"],
    },
    entry_points={"console_scripts": ["scope-megatron=scope_megatron.cli:main"]},
)
