"""SGLang 0.5.23 ``/generate`` protocol pieces shared by the client and the embedded engine.

Everything here follows SGLang 0.5.23's source (``docs/sglang-protocol.md`` §1):

- :data:`SAMPLING_PARAM_KEYS`: the keys SGLang's schema contract accepts inside
  ``sampling_params``; any other key is an HTTP 400 ``{"error": "unknown field ..."}``.
- :class:`SamplingParams`: explicit sampling settings a trainer sends on every request
  (SGLang's defaults are never relied upon: ``max_new_tokens`` defaults to 128 there).
- :func:`validate_sampling_params`: the server-side check (types strict as serde's, value
  ranges as ``sglang/srt/sampling/sampling_params.py::verify``), raising
  :class:`ProtocolError` whose text names the bad field.
- Log-prob entries are 3-element arrays ``[logprob | null, token_id, text | null]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# The contract list ``_FIELDS_SamplingParams`` of SGLang 0.5.23 (order as there, so the
# "expected one of" text matches the server's).
SAMPLING_PARAM_KEYS: tuple[str, ...] = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)

# Temperatures below this switch SGLang to greedy decoding (top_k = 1, temperature = 1).
GREEDY_TEMPERATURE = 1e-6
# SGLang's internal "whole vocabulary" top_k.
TOP_K_ALL = 1 << 30
DEFAULT_MAX_NEW_TOKENS = 128
MAX_STOP_STRINGS = 32


class ProtocolError(ValueError):
    """A request or response violates the protocol; the message names the field."""


def unknown_field_message(key: str, fields: Sequence[str]) -> str:
    """serde's ``unknown field`` text, as SGLang's contract check reports it."""
    listed = ", ".join(f"`{f}`" for f in fields)
    return f"unknown field `{key}`, expected one of {listed}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def is_int(value: Any) -> bool:
    """True for a JSON integer (a Python ``int`` that is not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def expect_int(value: Any, where: str) -> int:
    """``value`` as an int, or :class:`ProtocolError` naming ``where``."""
    if is_int(value):
        return value
    raise ProtocolError(f"{where}: invalid type: {_describe(value)}, expected i64")


def expect_float(value: Any, where: str) -> float:
    """``value`` as a float (JSON ints accepted), or :class:`ProtocolError` naming ``where``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ProtocolError(f"{where}: invalid type: {_describe(value)}, expected f64")


def expect_bool(value: Any, where: str) -> bool:
    """``value`` as a bool, or :class:`ProtocolError` naming ``where``."""
    if isinstance(value, bool):
        return value
    raise ProtocolError(f"{where}: invalid type: {_describe(value)}, expected a boolean")


def expect_int_list(value: Any, where: str) -> list[int]:
    """``value`` as a list of ints, or :class:`ProtocolError` naming ``where``."""
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: invalid type: {_describe(value)}, expected a sequence of i64")
    return [expect_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent explicitly with every ``/generate`` request.

    ``temperature``, ``top_p``, ``top_k`` and ``min_p`` are always sent, as the research note
    recommends for RL (native ``/generate`` merges only ``--preferred-sampling-params``).
    ``top_k = -1`` means the whole vocabulary. ``sampling_seed`` makes sampling reproducible.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    n: int = 1
    sampling_seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    min_new_tokens: int | None = None

    def __post_init__(self) -> None:
        check_sampling_values(self.to_json(), where="sampling_params")

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update(changes)
        return SamplingParams(**data)

    def to_json(self) -> dict[str, Any]:
        """The ``sampling_params`` JSON object (only contract keys; optional ones when set)."""
        out: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "min_p": float(self.min_p),
        }
        if self.stop_token_ids is not None:
            out["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        if self.stop is not None:
            out["stop"] = list(self.stop)
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.skip_special_tokens is not None:
            out["skip_special_tokens"] = bool(self.skip_special_tokens)
        if self.no_stop_trim is not None:
            out["no_stop_trim"] = bool(self.no_stop_trim)
        if self.n != 1:
            out["n"] = int(self.n)
        if self.sampling_seed is not None:
            out["sampling_seed"] = int(self.sampling_seed)
        for key in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, key)
            if value is not None:
                out[key] = float(value)
        if self.min_new_tokens is not None:
            out["min_new_tokens"] = int(self.min_new_tokens)
        return out


def check_sampling_values(params: Mapping[str, Any], where: str = "sampling_params") -> None:
    """Value-range checks of SGLang's ``SamplingParams.verify``; raises :class:`ProtocolError`."""
    temperature = params.get("temperature", 1.0)
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise ProtocolError(f"{where}.temperature must be a non-negative finite number, got {temperature}")
    top_p = params.get("top_p", 1.0)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ProtocolError(f"{where}.top_p must be in (0, 1], got {top_p}")
    min_p = params.get("min_p", 0.0)
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ProtocolError(f"{where}.min_p must be in [0, 1], got {min_p}")
    top_k = params.get("top_k")
    if top_k is not None and top_k != -1 and top_k < 1:
        raise ProtocolError(f"{where}.top_k must be -1 (whole vocabulary) or at least 1, got {top_k}")
    for key in ("frequency_penalty", "presence_penalty"):
        value = params.get(key)
        if value is not None and not -2.0 <= value <= 2.0:
            raise ProtocolError(f"{where}.{key} must be in [-2, 2], got {value}")
    rep = params.get("repetition_penalty")
    if rep is not None and not 0.0 < rep <= 2.0:
        raise ProtocolError(f"{where}.repetition_penalty must be in (0, 2], got {rep}")
    max_new = params.get("max_new_tokens")
    if max_new is not None and max_new < 0:
        raise ProtocolError(f"{where}.max_new_tokens must be at least 0, got {max_new}")
    min_new = params.get("min_new_tokens")
    if min_new is not None and (min_new < 0 or (max_new is not None and min_new > max_new)):
        raise ProtocolError(f"{where}.min_new_tokens must be in [0, max_new_tokens], got {min_new}")
    n = params.get("n")
    if n is not None and n < 1:
        raise ProtocolError(f"{where}.n must be at least 1, got {n}")
    stop = params.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise ProtocolError(f"{where}.stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")


_INT_KEYS = ("max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed", "stream_interval", "beam_width")
_FLOAT_KEYS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def validate_sampling_params(raw: Any, where: str = "sampling_params") -> dict[str, Any]:
    """Check one ``sampling_params`` object as SGLang's contract does and return it typed.

    Unknown keys are rejected (with serde's text), types are strict (``"1"`` is not a number,
    ``true`` is not an int), values are range-checked. ``null`` values mean "default".
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where}: invalid type: {_describe(raw)}, expected struct SamplingParams")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SAMPLING_PARAM_KEYS:
            raise ProtocolError(unknown_field_message(key, SAMPLING_PARAM_KEYS))
        if value is None:
            continue
        name = f"{where}.{key}"
        if key in _INT_KEYS:
            out[key] = expect_int(value, name)
        elif key in _FLOAT_KEYS:
            out[key] = expect_float(value, name)
        elif key in _BOOL_KEYS:
            out[key] = expect_bool(value, name)
        elif key == "stop":
            if isinstance(value, str):
                out[key] = [value]
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                out[key] = list(value)
            else:
                raise ProtocolError(f"{name}: expected a string or a list of strings, got {_describe(value)}")
        elif key == "stop_token_ids":
            out[key] = expect_int_list(value, name)
        else:
            out[key] = value
    check_sampling_values(out, where=where)
    return out


@dataclass(frozen=True)
class LogprobEntry:
    """One ``[logprob | null, token_id, text | null]`` entry."""

    logprob: float | None
    token_id: int
    text: str | None = None

    @staticmethod
    def parse(raw: Any, where: str) -> "LogprobEntry":
        """Parse a 3-element array; :class:`ProtocolError` names ``where`` when malformed."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 3:
            raise ProtocolError(f"{where}: expected a [logprob, token_id, text] array, got {raw!r}")
        logprob, token_id, text = raw
        if logprob is not None and not (isinstance(logprob, (int, float)) and not isinstance(logprob, bool)):
            raise ProtocolError(f"{where}: logprob must be a number or null, got {logprob!r}")
        if not is_int(token_id):
            raise ProtocolError(f"{where}: token_id must be an integer, got {token_id!r}")
        if text is not None and not isinstance(text, str):
            raise ProtocolError(f"{where}: text must be a string or null, got {text!r}")
        return LogprobEntry(None if logprob is None else float(logprob), token_id, text)

    def to_json(self) -> list[Any]:
        """The JSON 3-array."""
        return [self.logprob, self.token_id, self.text]


@dataclass(frozen=True)
class FinishReason:
    """``meta_info.finish_reason``: ``type`` is "stop", "length" or "abort"."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @staticmethod
    def parse(raw: Any, where: str = "meta_info.finish_reason") -> "FinishReason | None":
        """Parse the tagged object (``None`` while the request is running)."""
        if raw is None:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            raise ProtocolError(f"{where}: expected an object with a string 'type', got {raw!r}")
        return FinishReason(type=raw["type"], matched=raw.get("matched"), length=raw.get("length"),
                            message=raw.get("message"), status_code=raw.get("status_code"), raw=dict(raw))

    def to_json(self) -> dict[str, Any]:
        """The JSON object as SGLang writes it."""
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "abort":
            return {"type": "abort", "message": self.message, "status_code": self.status_code, "err_type": None}
        return dict(self.raw) or {"type": self.type}


def dtype_name(dtype: Any) -> str:
    """A torch dtype as SGLang resolves it with ``getattr(torch, s)``: ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class UnalignedBucketError(ValueError):
    """A ``flattened_bucket`` tensor would start at a byte offset that is not a multiple of its item size.

    The message is SGLang's own (``Unaligned received tensor ...``); ``index``, ``name``,
    ``offset`` and ``itemsize`` let the sender explain the refusal in its own terms.
    """

    def __init__(self, index: int, name: str, offset: int, dtype: Any):
        super().__init__(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
        self.index, self.name, self.offset, self.itemsize = index, name, offset, dtype.itemsize


def flattened_bucket_layout(names: Sequence[str], dtypes: Sequence[Any], shapes: Sequence[Sequence[int]]
                            ) -> list[tuple[str, Any, Any, int, int]]:
    """(name, torch dtype, torch.Size, byte offset, byte size) of each tensor in one ``flattened_bucket``.

    The one layout both sides use: the trainer packs its uint8 buffer with it
    (:func:`..weight_transfer.flatten_bucket`) and the embedded engine unpacks with it. It is
    SGLang 0.5.23's ``FlattenedTensorBucket.empty`` (``srt/weight_sync/tensor_bucket.py:86-113``):
    tensors back to back with no padding; a tensor whose offset is not a multiple of its item
    size raises :class:`UnalignedBucketError` (``:98-101``), a negative dimension, lists of
    different lengths or an empty bucket raise ``ValueError``. ``dtypes`` are torch dtypes or
    their names (``"bfloat16"``).
    """
    import torch

    layout = []
    offset = 0
    for index, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes, strict=True)):
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        shape = torch.Size(shape)
        if any(dim < 0 for dim in shape):
            raise ValueError(f"Negative dimension in received tensor {name}: {shape}")
        if offset % dtype.itemsize:
            raise UnalignedBucketError(index, name, offset, dtype)
        size = shape.numel() * dtype.itemsize
        layout.append((name, dtype, shape, offset, size))
        offset += size
    if not layout:
        raise ValueError("Cannot create empty tensor bucket")
    return layout
