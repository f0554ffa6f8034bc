"""The per-token numerics of the embedded engine: log-probs, penalties, sampling, stop checks.

Pure functions of a request and a logits row; they follow SGLang 0.5.23 (``docs/sglang-protocol.md``
§1, §4):

- output log-probs are ``log_softmax(logits / temperature)`` over the full vocabulary, before
  top-k/top-p/min-p truncation (greedy: plain ``log_softmax``); penalties apply first;
- prompt log-probs use temperature 1; the entry of token ``logprob_start_len`` is always null;
- ``output_ids`` run through the matched EOS / stop token.

Sampling draws from the request's own ``torch.Generator``, so a result does not depend on
which other requests share its batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..protocol import GREEDY_TEMPERATURE
from .request import GenRequest


def record_prompt_logprobs(req: GenRequest, prompt_logits: torch.Tensor) -> None:
    """Fill ``req.input_*`` for prompt tokens ``logprob_start_len .. P-1`` at temperature 1.

    ``prompt_logits``: [P, V], row ``i`` predicting prompt token ``i + 1``."""
    # The request's temperature is not applied: SGLang 0.5.23 takes prompt rows as log_softmax of
    # the raw logits (layers/logprob_processor.py:726, 734 in InputLogprobProcessor, which never
    # reads sampling_info) and has no request field or server flag that scales them.
    start = req.logprob_start_len
    prompt = req.prompt_ids
    lps: list[float | None] = []
    tops: list[list[tuple[float, int]] | None] = []
    ids_lp: list[list[tuple[float, int]] | None] = []
    if start < len(prompt):
        lps.append(None)
        tops.append(None)
        ids_lp.append(None)
        if start + 1 < len(prompt):
            rows = torch.log_softmax(prompt_logits[start:len(prompt) - 1].float(), dim=-1)
            targets = torch.tensor(prompt[start + 1:], device=rows.device)
            lps.extend(rows.gather(1, targets[:, None])[:, 0].tolist())
            if req.top_logprobs_num > 0:
                vals, idx = rows.topk(min(req.top_logprobs_num, rows.shape[-1]), dim=-1)
                tops.extend([list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())])
            if req.token_ids_logprob:
                sel = rows[:, req.token_ids_logprob].tolist()
                ids_lp.extend([list(zip(v, req.token_ids_logprob)) for v in sel])
    req.input_logprobs = lps
    req.input_top = tops
    req.input_ids_lp = ids_lp


def penalised_logits(req: GenRequest, logits: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """A copy of ``logits`` ([V]) with the frequency / presence / repetition penalties over the
    output so far, and the stop tokens masked while ``min_new_tokens`` is not reached."""
    p = req.params
    x = logits.clone()
    out_ids = req.output_ids
    if out_ids:
        counts = torch.bincount(torch.tensor(out_ids, device=x.device), minlength=x.shape[0]).to(x.dtype)
        freq = p.get("frequency_penalty", 0.0)
        pres = p.get("presence_penalty", 0.0)
        if freq:
            x -= freq * counts
        if pres:
            x -= pres * (counts > 0).to(x.dtype)
        rep = p.get("repetition_penalty", 1.0)
        if rep != 1.0:
            seen = counts > 0
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    min_new = p.get("min_new_tokens", 0)
    if min_new and len(out_ids) < min_new:
        stops = set(p.get("stop_token_ids") or [])
        if not p.get("ignore_eos", False):
            stops |= eos_ids
        for t in stops:
            if 0 <= t < x.shape[0]:
                x[t] = float("-inf")
    return x


def sample_truncated(logprobs: torch.Tensor, top_k: int, top_p: float, min_p: float,
                     generator: torch.Generator | None) -> int:
    """One token from ``exp(logprobs)`` ([V]) after top-k, then top-p, then min-p truncation."""
    probs = logprobs.exp()
    sorted_probs, order = probs.sort(descending=True)
    if 0 < top_k < sorted_probs.shape[0]:
        sorted_probs[top_k:] = 0.0
    if top_p < 1.0:
        cumulative = sorted_probs.cumsum(0)
        drop = (cumulative - sorted_probs) > top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
    if min_p > 0.0:
        sorted_probs[sorted_probs < min_p * sorted_probs[0]] = 0.0
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[choice.item()].item())


def sample_next_token(req: GenRequest, logits: torch.Tensor, eos_ids: set[int]) -> int:
    """Choose ``req``'s next token from its logits row ([V]); append it and, when the request
    asked for them, its log-prob rows to ``req``."""
    p = req.params
    x = penalised_logits(req, logits, eos_ids)
    temperature = p.get("temperature", 1.0)
    top_k = p.get("top_k", -1)
    greedy = temperature < GREEDY_TEMPERATURE or top_k == 1
    if temperature < GREEDY_TEMPERATURE:
        temperature = 1.0
    logprobs = torch.log_softmax(x / temperature, dim=-1)
    if greedy:
        token = int(torch.argmax(logprobs).item())
    else:
        token = sample_truncated(logprobs, top_k, p.get("top_p", 1.0), p.get("min_p", 0.0), req.generator)
    lp = float(logprobs[token].item())
    if not math.isfinite(lp):  # SGLang clamps to the dtype minimum: no -inf in JSON
        lp = float(torch.finfo(torch.float32).min)
    req.output_ids.append(token)
    if req.return_logprob:
        req.output_logprobs.append(lp)
        if req.top_logprobs_num > 0:
            vals, idx = logprobs.topk(min(req.top_logprobs_num, logprobs.shape[-1]))
            req.output_top.append(list(zip(vals.tolist(), idx.tolist())))
        if req.token_ids_logprob:
            req.output_ids_lp.append(list(zip(logprobs[req.token_ids_logprob].tolist(), req.token_ids_logprob)))
    return token


def stop_reason(req: GenRequest, token: int, eos_ids: set[int], tokenizer: Any) -> dict[str, Any] | None:
    """The finish reason ``{"type": "stop", "matched": ...}`` when ``token`` (just appended) ends
    ``req``: a stop token id, an EOS id unless ``ignore_eos``, or a stop string in the decoded
    tail (needs ``tokenizer``); None while ``min_new_tokens`` is not reached or nothing matched."""
    p = req.params
    if len(req.output_ids) < p.get("min_new_tokens", 0):
        return None
    if token in (p.get("stop_token_ids") or ()):
        return {"type": "stop", "matched": token}
    if not p.get("ignore_eos", False) and token in eos_ids:
        return {"type": "stop", "matched": token}
    stops = p.get("stop")
    if stops and tokenizer is not None:
        longest = max(len(s) for s in stops)
        tail = tokenizer.decode(req.output_ids[-(longest + 8):], skip_special_tokens=False)
        for s in stops:
            if s and s in tail:
                return {"type": "stop", "matched": s}
    return None
