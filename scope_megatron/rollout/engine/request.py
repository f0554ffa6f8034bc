"""What the embedded engine works on: its settings, one request's state, its two failure kinds."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..protocol import DEFAULT_MAX_NEW_TOKENS


class EngineError(RuntimeError):
    """An engine-side failure reported to the client with ``message``."""


class EngineFatal(RuntimeError):
    """A failure that takes the whole server down (SGLang's scheduler process dies on it)."""


@dataclass
class EngineConfig:
    """Settings of one embedded engine (``scope-megatron serve`` flags map onto these)."""

    model_path: str
    device: str | None = None            # None: cuda when available, else cpu
    dtype: str = "auto"                  # auto | float32 | bfloat16 | float16
    max_batch_size: int = 32
    # a new batch waits for companions until none arrived for batch_wait_s, at most batch_wait_max_s:
    # the requests of one rollout step reach the server one HTTP request at a time, and a batch
    # runs to completion, so a batch closed at the first arrival would run the step in pieces
    # (SGLang admits arrivals into the running batch at every step instead)
    batch_wait_s: float = 0.01
    batch_wait_max_s: float = 0.1
    context_length: int | None = None    # None: config.max_position_embeddings
    random_seed: int = 0
    weight_version: str = "default"
    skip_tokenizer_init: bool = False
    served_model_name: str | None = None
    attn_implementation: str = "sdpa"
    enable_deterministic_inference: bool = False  # honour sampling_seed (SGLang's flag of that name)
    # SGLang's --enable-memory-saver: /release_memory_occupation frees the weights (and KV cache);
    # without it the release only records the tags and frees nothing (its no-op adapter)
    enable_memory_saver: bool = False
    # SGLang's --enable-weights-cpu-backup: the released weights come back with their values on resume
    enable_weights_cpu_backup: bool = False


@dataclass
class GenRequest:
    """One sequence to generate or score (a batch item after ``n`` expansion).

    The first block is the request as the HTTP layer parsed it; the rest is filled in by the
    engine: the sampled tokens with their log-prob rows, the prompt's log-prob rows, the finish
    reason, and what the response reports about the moment it finished."""

    prompt_ids: list[int]
    params: dict[str, Any]
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    return_prompt_token_ids: bool = False
    # called once, on the worker thread, with this request when it finished
    on_done: Callable[["GenRequest"], None] | None = None
    # state
    output_ids: list[int] = field(default_factory=list)
    # per output token: its log-prob, its top-k (logprob, id) pairs, the requested ids' (logprob, id)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    output_ids_lp: list[list[tuple[float, int]]] = field(default_factory=list)
    # per prompt token from logprob_start_len (the first entry is None), the same three rows
    input_logprobs: list[float | None] | None = None
    input_top: list[list[tuple[float, int]] | None] | None = None
    input_ids_lp: list[list[tuple[float, int]] | None] | None = None
    finish: dict[str, Any] | None = None
    abort_requested: bool = False
    num_retractions: int = 0
    # (old scheduler version, number of output tokens when it changed)
    version_events: list[tuple[str, int]] = field(default_factory=list)
    generator: torch.Generator | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    created: float = field(default_factory=time.monotonic)
    text_offset_checked: int = 0
    # set when the request finished: the engine's two weight versions then and the time
    finished_at: float | None = None
    finished_weight_version: str | None = None
    finished_scheduler_version: str | None = None


def aborted_reason(message: str = "Aborted", status_code: int | None = None,
                   err_type: str | None = None) -> dict[str, Any]:
    """SGLang's ``FINISH_ABORT`` as JSON (``{"type": "abort", ...}``)."""
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": err_type}


def compute_weight_version_spans(events: list[tuple[str, int]], current: str, num_output: int) -> list[dict[str, Any]]:
    """Spans ``{"version", "start", "end"}`` (end exclusive) over output-token indices.

    ``events`` are ``(old_version, number of output tokens when the version changed)``.
    """
    spans: list[dict[str, Any]] = []
    for version, end in [*events, (current, num_output)]:
        end = min(end, num_output)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and spans[-1]["version"] == version:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans
