"""Logging set-up shared by every entry point: one format, rank-aware, megatron's noise filtered."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with the rank in each line; ranks other than 0 log warnings and up only."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_third_party()


def quiet_third_party() -> None:
    """Silence warnings that say nothing to our users (no Apex/TE on CPU, GPTModel deprecation)."""
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    ".*deprecat.*", "No CUDA runtime", "torch.distributed is disabled",
                    "The argument order of load has been changed"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)
    try:  # transformers' per-load progress bars say nothing in our logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)
    for name in ("megatron.core.dist_checkpointing", "megatron.core.utils", "megatron.core.optimizer",
                 "megatron.core.distributed", "megatron.core.transformer"):
        logging.getLogger(name).setLevel(logging.WARNING)
