"""SGLang 0.5.23's ``/generate`` wire format on the embedded server's side.

- :func:`parse_generate_request`: a JSON body -> engine requests (``n`` expanded, per-item
  fields broadcast), raising :class:`~scope_megatron.rollout.protocol.ProtocolError` naming the
  bad field;
- :func:`generate_response`: a finished request -> SGLang's reply object (``output_ids``,
  ``text``, ``meta_info`` with finish reason, token counts, weight versions and log-prob rows
  ``[logprob, token_id, text | null]``).
"""

from __future__ import annotations

from typing import Any, Callable

from ..engine import EmbeddedEngine, GenRequest, compute_weight_version_spans
from ..protocol import ProtocolError, expect_bool, expect_int, expect_int_list, validate_sampling_params

# Known sampling keys the embedded engine does not implement: non-null values are refused.
UNSUPPORTED_SAMPLING_KEYS = ("stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
                             "custom_params", "watermark", "choice")


def _per_item(value: Any, batch: int, name: str, parse: Callable[[Any, str], Any], default: Any,
              is_list_form: Callable[[Any], bool]) -> tuple[list[Any], bool]:
    """Broadcast a scalar-or-list request field to ``batch`` items; returns (values, was_list)."""
    if value is None:
        return [default] * batch, False
    if is_list_form(value):
        if len(value) != batch:
            raise ProtocolError(f"{name} has {len(value)} items for a batch of {batch}")
        return [default if v is None else parse(v, f"{name}[{i}]") for i, v in enumerate(value)], True
    return [parse(value, name)] * batch, False


def parse_generate_request(body: Any, engine: EmbeddedEngine) -> tuple[list[GenRequest], bool]:
    """Turn a ``/generate`` JSON body into engine requests (``n`` expanded, grouped per prompt).

    Returns (requests, single) where ``single`` means the reply is one object, not an array.
    Raises :class:`ProtocolError` with text naming the bad field.
    """
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if body.get("input_embeds") is not None:
        raise ProtocolError("input_embeds is not supported by the embedded engine")
    if has_text == has_ids:
        raise ProtocolError("exactly one of text / input_ids must be given")
    if has_ids:
        raw = body["input_ids"]
        if not isinstance(raw, list) or not raw:
            raise ProtocolError("input_ids must be a non-empty list of ints or a list of lists of ints")
        single = not isinstance(raw[0], list)
        prompts = [expect_int_list(raw, "input_ids")] if single else [
            expect_int_list(p, f"input_ids[{i}]") for i, p in enumerate(raw)]
    else:
        raw = body["text"]
        if engine.tokenizer is None:
            raise ProtocolError("text input needs a tokenizer; this server runs without one (send input_ids)")
        single = isinstance(raw, str)
        texts = [raw] if single else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ProtocolError("text must be a string or a list of strings")
        prompts = [engine.tokenizer.encode(t) for t in texts]
    batch = len(prompts)
    for i, p in enumerate(prompts):
        if not p:
            raise ProtocolError(f"input_ids[{i}] is empty" if not single else "input_ids is empty")

    sp_raw = body.get("sampling_params")
    if isinstance(sp_raw, list):
        if len(sp_raw) != batch:
            raise ProtocolError(f"sampling_params has {len(sp_raw)} items for a batch of {batch}")
        params = [validate_sampling_params(s, f"sampling_params[{i}]") for i, s in enumerate(sp_raw)]
    else:
        params = [validate_sampling_params(sp_raw)] * batch
    for i, p in enumerate(params):
        for key in UNSUPPORTED_SAMPLING_KEYS:
            if p.get(key) is not None:
                raise ProtocolError(f"sampling_params.{key} is not supported by the embedded engine")
        if p.get("beam_width", 1) != 1:
            raise ProtocolError("sampling_params.beam_width > 1 is not supported by the embedded engine")
    ns = {p.get("n", 1) for p in params}
    if len(ns) != 1:
        raise ProtocolError("every item of sampling_params must have the same n")
    n = ns.pop()

    def is_list(v: Any) -> bool:
        return isinstance(v, list)

    return_logprob, lp_list = _per_item(body.get("return_logprob"), batch, "return_logprob", expect_bool, False, is_list)
    start_len, sl_list = _per_item(body.get("logprob_start_len"), batch, "logprob_start_len", expect_int, -1, is_list)
    top_num, tn_list = _per_item(body.get("top_logprobs_num"), batch, "top_logprobs_num", expect_int, 0, is_list)
    token_ids_lp, ti_list = _per_item(body.get("token_ids_logprob"), batch, "token_ids_logprob", expect_int_list,
                                      None, lambda v: isinstance(v, list) and bool(v) and isinstance(v[0], list))
    if n > 1 and (lp_list or sl_list or tn_list or ti_list):
        raise ProtocolError("list-form return_logprob / logprob_start_len / top_logprobs_num / token_ids_logprob "
                            "is not allowed with n > 1")
    text_in_lp = expect_bool(body.get("return_text_in_logprobs", False) or False, "return_text_in_logprobs")
    return_prompt_ids = expect_bool(body.get("return_prompt_token_ids", False) or False, "return_prompt_token_ids")
    rid = body.get("rid")
    if rid is None or n > 1:
        rids = [None] * batch
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(batch)]
    elif isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid):
        rids = list(rid)
    else:
        raise ProtocolError(f"rid must be a string or a list of {batch} strings")

    requests: list[GenRequest] = []
    for i in range(batch):
        for k in range(n):
            # SGLang 0.5.23 srt/managers/tokenizer_manager.py:2163-2183 copies the request for each of
            # the n samples: the same sampling_seed, so identical samples under deterministic inference
            p = dict(params[i])
            kwargs = dict(prompt_ids=list(prompts[i]), params=p, return_logprob=return_logprob[i],
                          logprob_start_len=start_len[i], top_logprobs_num=top_num[i],
                          token_ids_logprob=token_ids_lp[i], return_text_in_logprobs=text_in_lp,
                          return_prompt_token_ids=return_prompt_ids)
            if rids[i] is not None:
                kwargs["rid"] = rids[i]
            requests.append(GenRequest(**kwargs))
    return requests, single and n == 1


# ---------------------------------------------------------------------------- the reply
def _token_text(tokenizer: Any, token_id: int) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _entries(tokenizer: Any, values: list[float | None], ids: list[int], with_text: bool) -> list[list[Any]]:
    return [[v, t, _token_text(tokenizer, t) if with_text else None] for v, t in zip(values, ids)]


def _top_rows(tokenizer: Any, rows: list[list[tuple[float, int]] | None], with_text: bool) -> list[Any]:
    return [None if row is None else [[v, t, _token_text(tokenizer, t) if with_text else None] for v, t in row]
            for row in rows]


def _output_text(req: GenRequest, tokenizer: Any) -> str:
    """The decoded output, the matched stop token or string trimmed unless ``no_stop_trim``."""
    p = req.params
    skip = p.get("skip_special_tokens", True)
    ids = req.output_ids
    matched = (req.finish or {}).get("matched")
    no_trim = p.get("no_stop_trim", False)
    if not no_trim and isinstance(matched, int) and ids and ids[-1] == matched:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=skip)
    if not no_trim and isinstance(matched, str) and matched in text:
        text = text[:text.rindex(matched)]
    return text


def generate_response(req: GenRequest, engine: EmbeddedEngine) -> dict[str, Any]:
    """SGLang's ``/generate`` reply object for the finished ``req`` of ``engine``."""
    tokenizer = engine.tokenizer
    n_out = len(req.output_ids)
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": n_out,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "num_retractions": req.num_retractions,
        "weight_version": req.finished_weight_version,
        "e2e_latency": req.finished_at - req.created,
    }
    spans = compute_weight_version_spans(req.version_events, req.finished_scheduler_version, n_out)
    if spans:
        meta["weight_versions"] = spans
        meta["weight_version"] = spans[-1]["version"]
    if req.return_logprob:
        text = req.return_text_in_logprobs and tokenizer is not None
        start = req.logprob_start_len
        # SGLang 0.5.23 srt/managers/scheduler_components/logprob_result_processor.py:52-55 reports
        # prompt ids >= vocab_size - 1 as 0 (model_config.vocab_size: the HF config's)
        clip = int(getattr(engine.hf_config, "vocab_size", None) or engine.vocab_size) - 1
        input_ids = [t if t < clip else 0 for t in req.prompt_ids[start:]]
        meta["input_token_logprobs"] = _entries(tokenizer, req.input_logprobs or [], input_ids, text)
        meta["output_token_logprobs"] = _entries(tokenizer, req.output_logprobs, req.output_ids, text)
        meta["output_token_logprobs_length"] = n_out
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = _top_rows(tokenizer, req.input_top or [], text)
            meta["output_top_logprobs"] = _top_rows(tokenizer, req.output_top, text)
        if req.token_ids_logprob:
            meta["input_token_ids_logprobs"] = _top_rows(tokenizer, req.input_ids_lp or [], text)
            meta["output_token_ids_logprobs"] = _top_rows(tokenizer, req.output_ids_lp, text)
    body: dict[str, Any] = {"output_ids": list(req.output_ids), "meta_info": meta}
    if tokenizer is not None:
        body["text"] = _output_text(req, tokenizer)
    if req.return_prompt_token_ids:
        body["prompt_token_ids"] = list(req.prompt_ids)
    return body
