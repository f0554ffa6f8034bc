"""The student being trained: the megatron model, its DDP wrapper, optimizer and LR schedule, and
the two passes a step makes over its micro-batches (forward-only old log-probs, then the update)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class UpdateResult:
    """What ``algorithm.updates_per_batch`` optimizer steps on one batch did."""

    updated: bool            # at least one optimizer step was applied
    first: Any | None        # megatron_step.TrainStepResult of the first update (its metrics are logged)
    failure: str | None      # why an update was skipped (NaN/inf loss or gradients); later ones are not tried


def student_format(student: str | Path) -> str | None:
    """What ``model.student`` is: ``"checkpoint"`` (a converted one, scope_megatron.json), ``"hf"``
    (an HF directory, config.json), or None (neither)."""
    from ..model import checkpoint as model_ckpt

    student = Path(student)
    if (student / model_ckpt.META_FILE).is_file():
        return "checkpoint"
    if (student / "config.json").is_file():
        return "hf"
    return None


class Learner:
    """Model, DDP, optimizer and scheduler of this rank, built from ``model.student`` (a
    converted checkpoint or an HF directory), with the objective's two adapters."""

    def __init__(self, cfg: Config, dtype: torch.dtype, device: torch.device):
        from ..megatron_step import wrap_for_training
        from ..model import checkpoint as model_ckpt
        from ..model.arch import arch_from_hf_config, load_hf_config
        from ..model.builder import ModelOptions, build_gpt_model, resolve_sequence_parallel, sequence_length_multiple

        self.dtype = dtype
        self.device = device
        self.supervised = cfg.supervised
        self.updates_per_batch = cfg.algorithm.updates_per_batch
        student = Path(cfg.model.student)
        source = student_format(student)
        if source == "checkpoint":
            self.arch, _ = model_ckpt.read_meta(student)
            self.hf_side_dir = student / model_ckpt.HF_SUBDIR  # tokenizer and HF config beside the weights
            from_hf = False
        elif source == "hf":
            self.arch = arch_from_hf_config(load_hf_config(student))
            self.hf_side_dir = student
            from_hf = True
        else:
            raise ConfigError("model.student", f"{cfg.model.student!r} is neither a converted checkpoint "
                              "(scope_megatron.json) nor an HF directory (config.json)")
        options = ModelOptions.from_config(cfg)
        self.model = build_gpt_model(self.arch, params_dtype=dtype, options=options, perform_initialization=False)
        # what every micro-batch's sequence length must be a multiple of (sequence parallelism)
        self.length_multiple = sequence_length_multiple(
            resolve_sequence_parallel(options.sequence_parallel, cfg.parallel.tp), cfg.parallel.tp, cfg.parallel.cp)
        self._load_initial_weights(self.model, student, from_hf)
        self.objective = cfg.objective_config()
        # GRPO's KL to the initial policy: a frozen copy of model.student, forward only (its
        # parameters cost one more model in the training dtype per rank, sharded by TP and PP)
        self.reference_model = None
        if self.objective.method == "grpo" and self.objective.grpo_kl_beta > 0:
            self.reference_model = build_gpt_model(self.arch, params_dtype=dtype, options=options,
                                                   perform_initialization=False)
            self._load_initial_weights(self.reference_model, student, from_hf)
            self.reference_model.eval()
            self.reference_model.requires_grad_(False)
            logger.info("reference model for algorithm.grpo_kl_beta=%g: a frozen copy of %s (%.2f GiB of "
                        "parameters on this rank)", self.objective.grpo_kl_beta, student,
                        sum(t.numel() * t.element_size() for t in self.reference_model.parameters()) / 2**30)
        o = cfg.optimizer
        self.ddp_model, self.optimizer, self.scheduler = wrap_for_training(
            self.model, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            lr_warmup_steps=o.lr_warmup_steps, lr_decay_style=o.lr_decay_style,
            lr_decay_steps=cfg.steps * self.updates_per_batch, min_lr=o.min_lr)
        # the teacher's top-k per response token, for the top-k KL term (0: not requested)
        self.teacher_topk = cfg.algorithm.topk_k if self.objective.topk_kl != "none" and not self.supervised else 0
        # sft / kd train plain NLL on given text: no rollout temperature to match
        scale = cfg.algorithm.scale_logits_by_rollout_temperature and not self.supervised
        self.logprob_temperature = cfg.rollout.temperature if scale else 1.0
        self.old_logprobs_from_rollout = cfg.algorithm.old_logprobs == "rollout"  # no forward-only pass

    def _load_initial_weights(self, model: Any, student: Path, from_hf: bool) -> None:
        """``model.student``'s weights into ``model`` (an HF directory or a converted checkpoint)."""
        from ..model import checkpoint as model_ckpt

        if from_hf:
            from ..model.hf_io import HFWeightReader, load_hf_into_model

            reader = HFWeightReader(student, self.arch)
            reader.check_complete()
            load_hf_into_model(model, self.arch, reader)
        else:
            model_ckpt.load_model(model, student)

    def reference_logprobs(self, data: Any) -> Any | None:
        """The initial policy's log-probs of every response token (forward only through the frozen
        reference model, objective.megatron.OldLogprobs in the training micro-batches' layout);
        ``None`` without ``algorithm.grpo_kl_beta``."""
        if self.reference_model is None:
            return None
        from ..objective.megatron import old_logprobs

        return old_logprobs(self.reference_model, data, vocab_size=self.arch.vocab_size,
                            temperature=self.logprob_temperature, device=self.device)

    def old_logprobs(self, data: Any) -> Any | None:
        """The current policy's log-probs of every response token (forward only) and their
        per-trajectory means (objective.megatron.OldLogprobs); with ``algorithm.old_logprobs:
        rollout`` only the means, from the engine's log-probs; ``None`` for sft / kd, which have
        no old policy."""
        if self.supervised:
            return None
        from ..objective.megatron import old_logprobs, rollout_means_only

        if self.old_logprobs_from_rollout:
            return rollout_means_only(data)
        return old_logprobs(self.ddp_model, data, vocab_size=self.arch.vocab_size,
                            temperature=self.logprob_temperature, device=self.device)

    def update(self, data: Any, plan: Any, old: Any | None, reference: Any | None = None) -> UpdateResult:
        """``updates_per_batch`` optimizer steps with the objective's loss (``reference``: the
        :meth:`reference_logprobs` of GRPO's KL term); a step whose loss or gradient norm is not
        finite is skipped by ``train_step`` and ends the updates."""
        from ..megatron_step import train_step
        from ..objective.megatron import make_loss_fn

        loss_fn = make_loss_fn(self.objective, plan, vocab_size=self.arch.vocab_size,
                               temperature=self.logprob_temperature, supervised=self.supervised,
                               use_topk=self.teacher_topk > 0, old_logprobs=old, ref_logprobs=reference)
        first, updated = None, False
        for _ in range(self.updates_per_batch):
            result = train_step(self.ddp_model, self.optimizer, self.scheduler, data.micro_batches, loss_fn)
            if not result.update_successful or not math.isfinite(result.loss):
                return UpdateResult(updated=updated, first=first,
                                    failure=f"loss {result.loss}, grad norm {result.grad_norm}")
            updated = True
            first = first or result
        return UpdateResult(updated=updated, first=first, failure=None)

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a training checkpoint saves and loads besides the run state."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def export_hf(self, out_dir: str | Path) -> Path:
        """The current weights as an HF directory (a collective: every rank takes part)."""
        from .checkpointing import export_hf

        return export_hf(self.model, self.arch, out_dir, self.hf_side_dir)
