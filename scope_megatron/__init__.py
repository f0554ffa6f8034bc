"""scope-megatron: SCOPE on-policy distillation on megatron-core.

Modules, one concept each:
- ``cpu_shims``: the few monkeypatches megatron-core needs on a machine without CUDA.
- ``model``: HF config -> megatron-core GPTModel, HF <-> Megatron weight mapping.
- ``parallel``: torch.distributed + megatron parallel-state setup.
- ``objective``: the SCOPE math (routing, group weights, vocab-parallel log-probs, loss).
- ``rollout``: SGLang client, launcher, embedded engine, rewards, prompt data.
"""

__version__ = "0.1.0"
