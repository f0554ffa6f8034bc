"""HF <-> Megatron checkpoint tools.

- ``python -m checkpoints_tools.hf_to_megatron --hf HF_DIR --out CKPT_DIR``
- ``python -m checkpoints_tools.megatron_to_hf --ckpt CKPT_DIR --out HF_DIR``
- ``torchrun --nproc_per_node=N -m checkpoints_tools.verify --hf HF_DIR --ckpt CKPT_DIR --tp T --pp P``

Each may run under torchrun with ``--tp`` / ``--pp`` to split the work (and the memory) over
ranks. Errors in the input are reported by name with exit code 2 and leave no output behind.
"""
