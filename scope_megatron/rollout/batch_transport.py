"""Rank 0's rollout batch to every rank as a few flat typed tensors, not a pickle of Python lists.

A step's :class:`~scope_megatron.rollout.types.RolloutBatch` holds, per trajectory, a prompt, a
response, two log-prob lists and optionally the teacher's top-k ids / log-probs per response
token ([R][K]). Pickled and broadcast with ``broadcast_object_list`` that is ~10^8 Python
objects per step at the paper's size (~10^9 with top-k), built again on every receiving rank.
Here the batch travels as:

* a small pickled header: the status envelope (``ok`` / ``stop`` / ``error`` and the message),
  the step, its timings, the buffer sizes, and the few strings per trajectory
  (``reward_status``, ``finish``, ``weight_version``, ``teacher``);
* ``meta`` [N, 9] int64: group, prompt_index, sample and the six field lengths (below);
* ``rewards`` [N] float64 (a Python float is a float64: exact);
* ``token_ids`` int32: every prompt, then every response, then every top-k id row
  (concatenated in trajectory order);
* ``logprobs`` float32: every rollout log-prob list, then every teacher log-prob list, then
  every top-k log-prob row.

Log-probs travel as float32: the engines compute them in float32 and the trainer's tensors are
float32 (:mod:`scope_megatron.trainer.batching`), so values that came from an engine arrive
exactly; ``-inf`` (a masked top-k entry) and NaN pass unchanged. Token ids must fit int32 (a
vocabulary id always does; a larger value is refused by the conversion).

On the receiving ranks every list field of the rebuilt :class:`Trajectory` is a
:class:`TensorListView`, a read-only list look-alike over a slice of the received buffers: no
per-token Python object exists until something iterates a field, and then only for that
field (batching builds each trajectory's tensors when it packs it, see
:class:`TensorListView`). The source rank gets its own batch object back.

Memory on a receiving rank: the raw bytes of the buffers plus ~1 KiB per trajectory.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from .types import RolloutBatch, Trajectory

Status = Literal["ok", "stop", "error"]

# meta columns, in this order: (Trajectory field or length of a field)
_META_COLUMNS = ("group", "prompt_index", "sample", "prompt_len", "response_len", "rollout_lp_len",
                 "teacher_lp_len", "topk_id_rows", "topk_lp_rows")
# broadcast large buffers in pieces: each call stays far below gloo's 2 GiB message sizes
_CHUNK_BYTES = 128 * 1024 * 1024


class TensorListView(Sequence):
    """A read-only list look-alike over a 1-D ([n]) or 2-D ([n, k]: n rows of k) tensor slice.

    It answers what code written for the plain lists of a :class:`Trajectory` asks:
    ``len``, truth value, indexing (a Python scalar, or a row view for 2-D), slicing (a view),
    iteration (Python ints / floats, or lists for 2-D rows, through one ``tolist`` of the slice),
    ``==`` with lists or views, and ``+`` with a list or a view (a new Python list, as list
    concatenation gives). ``torch.tensor(view)`` converts through that iteration (a transient
    Python list of the slice); :attr:`tensor` and ``numpy.asarray(view)`` reach the data
    without any copy. Copying or pickling a view copies its slice only, never the buffer it
    views.
    """

    __slots__ = ("_values",)

    def __init__(self, values: torch.Tensor):
        if values.dim() not in (1, 2):
            raise ValueError(f"TensorListView holds a 1-D or 2-D tensor, got shape {tuple(values.shape)}")
        self._values = values

    @property
    def tensor(self) -> torch.Tensor:
        """The values ([n] or [n, k]), a view into the received buffer: read it, do not write it."""
        return self._values

    def tolist(self) -> list:
        return self._values.tolist()

    def __len__(self) -> int:
        return self._values.shape[0]

    def __bool__(self) -> bool:
        return self._values.shape[0] > 0

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return TensorListView(self._values[index])
        row = self._values[index]
        return TensorListView(row) if row.dim() else row.item()

    def __iter__(self):
        return iter(self._values.tolist())

    def __contains__(self, value: Any) -> bool:
        return value in self._values.tolist()

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, TensorListView):
            return self._values.tolist() == other._values.tolist()
        if isinstance(other, (list, tuple)):
            return self._values.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # mutable-list semantics: equal to a list, so not hashable either

    def __add__(self, other: Any) -> list:
        if isinstance(other, (TensorListView, list, tuple)):
            return self._values.tolist() + list(other)
        return NotImplemented

    def __radd__(self, other: Any) -> list:
        if isinstance(other, (list, tuple)):
            return list(other) + self._values.tolist()
        return NotImplemented

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self._values.numpy()
        return array.astype(dtype) if dtype is not None else array

    def __copy__(self) -> "TensorListView":
        return self  # read-only: a shallow copy may share

    def __deepcopy__(self, memo: dict) -> "TensorListView":
        return TensorListView(self._values.clone())

    def __reduce__(self):
        return TensorListView, (self._values.clone(),)

    def __repr__(self) -> str:
        return f"TensorListView({self._values.tolist()!r})" if self._values.numel() <= 8 else \
            f"TensorListView(shape={tuple(self._values.shape)}, dtype={self._values.dtype})"


@dataclass
class RolloutMessage:
    """What rank 0 tells every rank about a step's rollouts: a batch, a stop, or an error."""

    status: Status
    batch: RolloutBatch | None = None
    message: str = ""  # the error's text (status "error")

    @classmethod
    def ok(cls, batch: RolloutBatch) -> "RolloutMessage":
        return cls("ok", batch)

    @classmethod
    def stop(cls) -> "RolloutMessage":
        return cls("stop")

    @classmethod
    def error(cls, message: str) -> "RolloutMessage":
        return cls("error", message=message)


_NUMPY_DTYPES = {torch.int32: np.int32, torch.float32: np.float32}


def _flat(value: Any, dtype: torch.dtype, rows: int = 0, width: int = 0) -> torch.Tensor:
    """A list field as a flat tensor of ``dtype``: a list, ``rows`` nested lists of ``width``
    (top-k; widths already checked), a TensorListView, an ndarray or a tensor.

    Lists go through numpy (an order of magnitude faster than ``torch.tensor`` on a list); a
    value outside int32 raises OverflowError.
    """
    if isinstance(value, TensorListView):
        value = value.tensor
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).to(dtype)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.reshape(-1).astype(_NUMPY_DTYPES[dtype], copy=False))
    if rows and isinstance(value[0], (list, tuple)):
        array = np.fromiter(itertools.chain.from_iterable(value), dtype=_NUMPY_DTYPES[dtype], count=rows * width)
    else:
        array = np.asarray(value, dtype=_NUMPY_DTYPES[dtype]).reshape(-1)
    return torch.from_numpy(array)


def _rows_and_width(value: Any, what: str, t: Trajectory) -> tuple[int, int]:
    """(number of rows, row width) of a top-k field; every row must have the same width."""
    rows = len(value)
    if rows == 0:
        return 0, 0
    if isinstance(value, (TensorListView, np.ndarray, torch.Tensor)):
        shape = tuple(value.tensor.shape if isinstance(value, TensorListView) else value.shape)
        if len(shape) != 2:
            raise ValueError(f"trajectory (prompt {t.prompt_index}, sample {t.sample}): {what} has shape {shape}, "
                             "expected [rows, k]")
        return rows, shape[1]
    widths = set(map(len, value))
    if len(widths) != 1:
        raise ValueError(f"trajectory (prompt {t.prompt_index}, sample {t.sample}): {what} rows of different "
                         f"lengths ({sorted(widths)})")
    return rows, widths.pop()


def _pack(batch: RolloutBatch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header (picklable, small) and the four tensors of ``batch``."""
    trajs = batch.trajectories
    n = len(trajs)
    meta_rows = []
    width = 0
    rows_list = []
    for t in trajs:
        id_rows, id_width = _rows_and_width(t.teacher_topk_ids, "teacher_topk_ids", t)
        lp_rows, lp_width = _rows_and_width(t.teacher_topk_logprobs, "teacher_topk_logprobs", t)
        for w in (id_width, lp_width):
            if w and width and w != width:
                raise ValueError(f"trajectory (prompt {t.prompt_index}, sample {t.sample}): top-k rows of width {w}, "
                                 f"other trajectories of this batch have {width}")
            width = width or w
        rows_list.append((id_rows, lp_rows))
        meta_rows.append([t.group, t.prompt_index, t.sample, len(t.prompt_ids), len(t.response_ids),
                          len(t.rollout_logprobs), len(t.teacher_logprobs), id_rows, lp_rows])
    meta = torch.tensor(meta_rows, dtype=torch.int64).reshape(n, len(_META_COLUMNS))
    lens = meta.sum(dim=0).tolist() if n else [0] * len(_META_COLUMNS)
    num_ids = lens[3] + lens[4] + lens[7] * width
    num_lps = lens[5] + lens[6] + lens[8] * width
    token_ids = torch.empty(num_ids, dtype=torch.int32)
    logprobs = torch.empty(num_lps, dtype=torch.float32)
    # section by section, each trajectory's slice written in place: no second copy of the buffers
    for buffer, dtype, fields in ((token_ids, torch.int32, ("prompt_ids", "response_ids", "teacher_topk_ids")),
                                  (logprobs, torch.float32,
                                   ("rollout_logprobs", "teacher_logprobs", "teacher_topk_logprobs"))):
        pos = 0
        for column, field_name in enumerate(fields):
            for t, (id_rows, lp_rows) in zip(trajs, rows_list):
                rows = 0 if column < 2 else (id_rows if dtype == torch.int32 else lp_rows)
                values = _flat(getattr(t, field_name), dtype, rows, width)
                buffer[pos:pos + values.numel()] = values
                pos += values.numel()
    header = {"step": batch.step, "timings": dict(batch.timings), "count": n, "topk_width": width,
              "num_token_ids": num_ids, "num_logprobs": num_lps,
              "reward_status": [t.reward_status for t in trajs], "finish": [t.finish for t in trajs],
              "weight_version": [t.weight_version for t in trajs], "teacher": [t.teacher for t in trajs]}
    tensors = {"meta": meta, "rewards": torch.tensor([float(t.reward) for t in trajs], dtype=torch.float64),
               "token_ids": token_ids, "logprobs": logprobs}
    return header, tensors


def _unpack(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RolloutBatch:
    """The batch whose list fields are views into ``tensors``."""
    n, width = header["count"], header["topk_width"]
    columns = tensors["meta"].t().tolist() if n else [[] for _ in _META_COLUMNS]
    groups, prompt_indices, samples, p_len, r_len, rl_len, tl_len, id_rows, lp_rows = columns
    rewards = tensors["rewards"].tolist()
    token_ids, logprobs = tensors["token_ids"], tensors["logprobs"]

    def cut(buffer: torch.Tensor, pos: int, sizes: list[int], width: int | None) -> tuple[list[TensorListView], int]:
        """Per-trajectory views of one section starting at ``pos``: 1-D slices of ``sizes[i]``
        elements (``width`` None), or ``sizes[i]`` rows of ``width`` ([rows, width])."""
        views = []
        for rows in sizes:
            count = rows if width is None else rows * width
            piece = buffer[pos:pos + count]
            views.append(TensorListView(piece if width is None else piece.view(rows, width)))
            pos += count
        return views, pos

    prompts, pos = cut(token_ids, 0, p_len, None)
    responses, pos = cut(token_ids, pos, r_len, None)
    topk_ids, _ = cut(token_ids, pos, id_rows, width)
    rollout_lps, pos = cut(logprobs, 0, rl_len, None)
    teacher_lps, pos = cut(logprobs, pos, tl_len, None)
    topk_lps, _ = cut(logprobs, pos, lp_rows, width)
    trajectories = [
        Trajectory(group=groups[i], prompt_index=prompt_indices[i], sample=samples[i], prompt_ids=prompts[i],
                   response_ids=responses[i], rollout_logprobs=rollout_lps[i], teacher_logprobs=teacher_lps[i],
                   reward=rewards[i], reward_status=header["reward_status"][i], finish=header["finish"][i],
                   weight_version=header["weight_version"][i], teacher_topk_ids=topk_ids[i],
                   teacher_topk_logprobs=topk_lps[i], teacher=header["teacher"][i])
        for i in range(n)]
    return RolloutBatch(step=header["step"], trajectories=trajectories, timings=header["timings"])


def _broadcast_tensor(tensor: torch.Tensor, src: int, group: Any) -> None:
    """``dist.broadcast`` of a contiguous CPU tensor, in pieces of at most ``_CHUNK_BYTES``."""
    flat = tensor.view(-1)
    step = max(1, _CHUNK_BYTES // max(flat.element_size(), 1))
    for start in range(0, flat.numel(), step):
        dist.broadcast(flat[start:start + step], src=src, group=group)


def broadcast_rollout_message(message: RolloutMessage | None, *, src: int, group: Any = None) -> RolloutMessage:
    """Broadcast rank ``src``'s :class:`RolloutMessage` to every rank of ``group`` (a collective).

    ``message``: the message on ``src`` (ignored elsewhere: pass None). ``src`` is a global rank;
    ``group`` a gloo (CPU) process group such as the trainer's control group, or None for the
    default group. Returns ``src``'s own message object on ``src``, and on the other ranks an
    equal message whose batch has :class:`TensorListView` list fields.
    """
    is_src = dist.get_rank() == src
    header_box: list[Any] = [None]
    tensors: dict[str, torch.Tensor] = {}
    if is_src:
        if message is None or message.status not in ("ok", "stop", "error"):
            raise ValueError(f"broadcast_rollout_message on the source rank needs a RolloutMessage, got {message!r}")
        if message.status == "ok" and message.batch is None:
            raise ValueError("a RolloutMessage with status 'ok' needs a batch")
        header: dict[str, Any] = {"status": message.status, "message": message.message}
        if message.status == "ok":
            try:
                header["batch"], tensors = _pack(message.batch)
            except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
                # a batch that cannot travel becomes an error on every rank, none left waiting
                message = RolloutMessage.error(f"rollout batch of step {message.batch.step} cannot be sent: {exc}")
                header = {"status": "error", "message": message.message}
        header_box[0] = header
    dist.broadcast_object_list(header_box, src=src, group=group)
    header = header_box[0]
    if header["status"] != "ok":
        return message if is_src else RolloutMessage(header["status"], None, header["message"])
    batch_header = header["batch"]
    if not is_src:
        n = batch_header["count"]
        tensors = {"meta": torch.empty((n, len(_META_COLUMNS)), dtype=torch.int64),
                   "rewards": torch.empty(n, dtype=torch.float64),
                   "token_ids": torch.empty(batch_header["num_token_ids"], dtype=torch.int32),
                   "logprobs": torch.empty(batch_header["num_logprobs"], dtype=torch.float32)}
    for name in ("meta", "rewards", "token_ids", "logprobs"):
        _broadcast_tensor(tensors[name], src, group)
    if is_src:
        return message
    return RolloutMessage("ok", _unpack(batch_header, tensors))


def broadcast_rollout_batch(batch: RolloutBatch | None, *, src: int, group: Any = None) -> RolloutBatch:
    """Broadcast rank ``src``'s batch (``batch`` on ``src``, None elsewhere); every rank returns it.

    The plain-batch form of :func:`broadcast_rollout_message` (status ``ok`` only).
    """
    is_src = dist.get_rank() == src
    out = broadcast_rollout_message(RolloutMessage.ok(batch) if is_src else None, src=src, group=group)
    assert out.batch is not None
    return out.batch


def tensor_backed(t: Trajectory) -> Trajectory:
    """``t`` with its list fields as :class:`TensorListView` (token ids int32, log-probs float32,
    the top-k fields [R, K]); equal to ``t`` field by field.

    For the rollout controller: converting each trajectory when it arrives spreads the one
    list-to-array conversion over the collection, and the broadcast then copies memory only
    (the conversion is most of the sender's time when the fields are Python lists).
    """
    fields = {}
    for name, dtype in (("prompt_ids", torch.int32), ("response_ids", torch.int32),
                        ("rollout_logprobs", torch.float32), ("teacher_logprobs", torch.float32)):
        fields[name] = TensorListView(_flat(getattr(t, name), dtype))
    for name, dtype in (("teacher_topk_ids", torch.int32), ("teacher_topk_logprobs", torch.float32)):
        rows, width = _rows_and_width(getattr(t, name), name, t)
        fields[name] = TensorListView(_flat(getattr(t, name), dtype, rows, width).view(rows, width))
    return dataclasses.replace(t, **fields)


def rollout_batch_nbytes(batch: RolloutBatch) -> int:
    """Bytes of the tensors :func:`broadcast_rollout_message` sends for ``batch`` (the header excluded)."""
    n, width, ids, lps = len(batch.trajectories), 0, 0, 0
    for t in batch.trajectories:
        id_rows, id_width = _rows_and_width(t.teacher_topk_ids, "teacher_topk_ids", t)
        lp_rows, lp_width = _rows_and_width(t.teacher_topk_logprobs, "teacher_topk_logprobs", t)
        ids += len(t.prompt_ids) + len(t.response_ids) + id_rows * id_width
        lps += len(t.rollout_logprobs) + len(t.teacher_logprobs) + lp_rows * lp_width
    return n * (len(_META_COLUMNS) + 1) * 8 + 4 * ids + 4 * lps


__all__ = ["RolloutMessage", "TensorListView", "broadcast_rollout_batch", "broadcast_rollout_message",
           "rollout_batch_nbytes", "tensor_backed"]
