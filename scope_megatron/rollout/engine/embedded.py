"""The embedded engine: a transformers model behind SGLang 0.5.23's engine semantics.

:class:`EmbeddedEngine` is the model runner. It loads the HF model, validates and seeds each
request, and generates for a batch: the worker (:mod:`.scheduler`) hands it up to
``max_batch_size`` requests, which are prefilled together (left padding, a KV cache), then
decoded one token per step for the whole batch until every request finished. The per-token
numerics are in :mod:`.sampling`, the weight-update endpoints in :mod:`.weights`; the HTTP
layer (:mod:`scope_megatron.rollout.server`) formats the finished requests as SGLang's replies.

As in SGLang, ``sampling_seed`` is honoured only when the engine runs with
``enable_deterministic_inference`` (then an unseeded request uses seed 42); otherwise every
request draws from the server seed and a request counter.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from ...model.builder import resolve_dtype
from ..protocol import DEFAULT_MAX_NEW_TOKENS, ProtocolError
from .request import EngineConfig, GenRequest, aborted_reason
from .sampling import record_prompt_logprobs, sample_next_token, stop_reason
from .scheduler import Scheduler
from .weights import WeightUpdates

logger = logging.getLogger(__name__)

# SGLang 0.5.23 srt/sampling/sampling_batch_info.py:157-171: the seed of an unseeded request
# under --enable-deterministic-inference
DETERMINISTIC_DEFAULT_SEED = 42


class EmbeddedEngine(WeightUpdates, Scheduler):
    """A transformers model behind a batching worker thread; thread-safe public methods."""

    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig, AutoModelForCausalLM

        super().__init__(config)
        self._init_weight_updates()
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        hf_config = AutoConfig.from_pretrained(config.model_path)
        # "auto": the HF config's dtype; fp32 when it names none, whatever the device
        self.dtype = resolve_dtype(config.dtype, cuda=False, auto=getattr(hf_config, "dtype", None))
        logger.info("loading %s on %s as %s", config.model_path, self.device, self.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=self.dtype,
                                                          attn_implementation=config.attn_implementation)
        self.model.to(self.device).eval()
        forward_args = inspect.signature(self.model.forward).parameters
        # transformers >= 5.2x renamed past_key_values to cache (input and output)
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self.hf_config = self.model.config
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
            except Exception as exc:  # a weights-only directory: serve input_ids only
                logger.warning("no tokenizer in %s (%s); serving input_ids only", config.model_path, exc)
        self.context_length = int(config.context_length or getattr(self.hf_config, "max_position_embeddings", 4096))
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_ids = self._eos_ids()
        self.pad_id = self._pad_id()
        self.model_path = config.model_path
        self._seed_counter = 0
        self.start_worker()

    # ------------------------------------------------------------------ info
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.hf_config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _pad_id(self) -> int:
        pad = getattr(self.hf_config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        return int(pad)

    def model_info(self) -> dict[str, Any]:
        """``GET /model_info`` body."""
        return {
            "model_path": self.model_path,
            "served_model_name": self.config.served_model_name or self.config.model_path,
            "tokenizer_path": None if self.tokenizer is None else self.config.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(self.hf_config, "model_type", None),
            "architectures": getattr(self.hf_config, "architectures", None),
        }

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the worker (waiting up to ``timeout_s`` for its current step) and destroy the groups."""
        super().shutdown(timeout_s)
        self.destroy_groups()

    # ------------------------------------------------------------------ requests
    def prepare(self, req: GenRequest) -> None:
        """Check ``req`` against this model (prompt ids, lengths, log-prob fields, stop strings),
        cap its ``max_new_tokens`` by the context, and seed its generator. While the weights or
        the KV cache are released a request takes the server down, as on SGLang
        (:meth:`~.weights.WeightUpdates.check_memory_resident`)."""
        self.check_memory_resident("a generate request")
        p = req.params
        prompt_len = len(req.prompt_ids)
        if prompt_len == 0:
            raise ProtocolError("input_ids: the prompt is empty")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ProtocolError(f"input_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if prompt_len >= self.context_length:
            raise ProtocolError(f"input_ids: the prompt has {prompt_len} tokens; the context length is {self.context_length}")
        if req.return_logprob:
            if req.logprob_start_len < -1 or req.logprob_start_len > prompt_len:
                raise ProtocolError(f"logprob_start_len ({req.logprob_start_len}) must be -1 or in [0, {prompt_len}] "
                                    f"(the prompt length)")
            if req.logprob_start_len == -1:
                req.logprob_start_len = prompt_len
        if req.top_logprobs_num < 0:
            raise ProtocolError(f"top_logprobs_num must be >= 0, got {req.top_logprobs_num}")
        if p.get("stop") and self.tokenizer is None:
            raise ProtocolError("sampling_params.stop needs a tokenizer (the server runs without one)")
        requested = p.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        req.max_new_tokens = max(0, min(requested, self.context_length - prompt_len - 1))
        if self.config.enable_deterministic_inference:
            # SGLang 0.5.23 srt/sampling/sampling_batch_info.py:157-171: seeds exist only in
            # deterministic mode, 42 for a request without one
            seed = p.get("sampling_seed")
            if seed is None:
                seed = DETERMINISTIC_DEFAULT_SEED
        else:
            # ... otherwise the seed tensor is None and sampling is unseeded: sampling_seed is ignored
            with self._cond:
                self._seed_counter += 1
                seed = self.config.random_seed * 1_000_003 + self._seed_counter
        req.generator = torch.Generator(device="cpu")
        req.generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def run_batch(self, batch: list[GenRequest]) -> None:
        """Prefill ``batch`` (left-padded, [B, width]), then decode one token per step for the
        whole batch until every request finished or the scheduler took the batch back."""
        seqs = [r.prompt_ids + r.output_ids for r in batch]
        lengths = [len(s) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, position = ids.to(self.device), mask.to(self.device), position.to(self.device)
        with self._model_lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache = out[self._cache_arg]
        logits = out.logits
        for i, req in enumerate(batch):
            if req.return_logprob and req.input_logprobs is None:
                record_prompt_logprobs(req, logits[i, width - lengths[i]:width - lengths[i] + len(req.prompt_ids)])
        last = logits[:, -1, :].float()  # [B, V]
        del out, logits
        next_position = position[:, -1:]
        while True:
            for req in batch:
                if req.finish is None and req.abort_requested:
                    self.finish(req, aborted_reason())
                elif req.finish is None and len(req.output_ids) >= req.max_new_tokens:
                    self.finish(req, {"type": "length", "length": req.max_new_tokens})
            active = [i for i, r in enumerate(batch) if r.finish is None]
            if not active:
                return
            step_tokens = torch.full((len(batch), 1), self.pad_id, dtype=torch.long)
            for i in active:
                token = sample_next_token(batch[i], last[i], self.eos_ids)
                reason = stop_reason(batch[i], token, self.eos_ids, self.tokenizer)
                if reason is not None:
                    self.finish(batch[i], reason)
                step_tokens[i, 0] = token
            self.last_progress = time.monotonic()
            if not any(r.finish is None for r in batch):
                return
            if self.between_steps(batch):
                return
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=mask.device)], dim=1)
            next_position = next_position + 1
            with self._model_lock:
                out = self.model(input_ids=step_tokens.to(self.device), attention_mask=mask, position_ids=next_position,
                                 use_cache=True, **{self._cache_arg: cache})
            cache = out[self._cache_arg]
            last = out.logits[:, -1, :].float()
            del out
