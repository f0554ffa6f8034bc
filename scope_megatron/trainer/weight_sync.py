"""Weight sync after each optimizer step: Megatron shards -> HF tensors -> the student engines.

Every rank iterates :func:`scope_megatron.model.hf_io.export_hf_tensors_to_rank0` (a
collective of the first data-parallel replica: each TP rank of each pipeline stage sends its
shards point to point to global rank 0, which merges them into HF names and layouts with the
vocabulary padding stripped, the same mapping as ``checkpoints_tools``; the other replicas
only wait). Before it, :func:`finish_param_sync` completes megatron's overlapped parameter
all-gather, if one is on, so the export reads the parameters of the step just taken. Global
rank 0 feeds the stream to
:class:`scope_megatron.rollout.weight_transfer.WeightTransfer`, which buckets it
(``sync.bucket_mb``) and sends it through the broadcast group (NCCL on GPU, gloo on CPU) or
as safetensors on a shared path, inside pause -> begin -> ... -> end -> continue, with
``weight_version = step``.

If sending fails on rank 0, rank 0 still drains the stream (so the other ranks' collectives
complete), then every rank learns the failure through the control group and raises
:class:`SyncError`.

Colocated engines on several nodes (``placement: colocated``, one student server per node):
tensor handles do not cross machines, so every node feeds its own engine. Rank 0 pauses every
engine; then each node's data-parallel replica exports to its root, the node's first rank
(:func:`~scope_megatron.model.hf_io.export_hf_tensors_to_replica_root`, all nodes at once), which
hands the tensors to the node's engine; every rank learns every node's outcome, and rank 0
continues the engines (:meth:`WeightSync._sync_nodes`).

``sync.verify``: after each sync, the first student worker continues a fixed prompt (the
data's first) greedily for ``sync.probe_tokens`` tokens with the weights it just received;
every student worker scores that continuation teacher-forced, and the trainer computes its own
log-probs of it (a forward-only pass through megatron's schedule, temperature 1, like the
engine's prompt log-probs). The statistic is the mean |lp_engine - lp_trainer| over the
continuation's tokens; above ``sync.verify_tolerance`` (default :func:`default_verify_tolerance`:
1e-3 in fp32, 0.1 in bf16) it raises SyncError, so garbled weights are caught at the step where
they arrive.

Why greedy tokens and a mean: the tokens are the engine's own top-1 choices, so their
log-probs are near 0 where bf16 rounding moves them least, and the mean over the tokens damps
the odd token near a tie; a fixed text (or the max over tokens) lets the noise of a few
low-probability tokens decide. A wrong mapping (a tensor that never arrived, a transposed or
swapped projection) changes the engine's top-1 tokens, which the trainer then finds unlikely:
the mean moves by whole nats, far above the tolerance.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..batch import MicroBatch, TokenFields
from ..megatron_step import run_forward

logger = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """Sending weights to the engines failed, or the engines disagree with the trainer afterwards."""


@dataclass
class Probe:
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class SyncResult:
    seconds: float = 0.0
    seconds_transfer: float = 0.0
    num_bytes: int = 0
    num_tensors: int = 0
    probe_max_abs_diff: float = float("nan")
    probe_mean_abs_diff: float = float("nan")


def finish_param_sync(ddp_model: Any) -> bool:
    """Complete megatron's overlapped parameter all-gather, if ``overlap_param_gather`` is on.

    With the distributed optimizer and ``overlap_param_gather``, ``optimizer.step()`` updates
    each DP rank's shard of the main parameters and the all-gather that refreshes the model's
    parameters runs later, bucket by bucket, from forward pre-hooks
    (megatron/core/distributed/distributed_data_parallel.py ``_make_forward_pre_hook``). An
    export straight after the step would read stale parameters, so each bucket group's
    ``finish_param_sync`` runs here (param_and_grad_buffer.py: it dispatches the all-gather when
    not yet dispatched, then waits); the next forward's hooks then find nothing left to do.
    A collective over the DP ranks: every rank calls it. Returns whether there was anything to
    finish (False for a model without megatron DDP or without the overlap).
    """
    chunks = ddp_model if isinstance(ddp_model, (list, tuple)) else [ddp_model]
    finished = False
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.overlap_param_gather:
            continue
        with torch.no_grad():
            for bucket_group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
                bucket_group.finish_param_sync(skip_next_bucket_dispatch=True)
        finished = True
    return finished


def released_engines_record(run_dir: str | Path) -> Path:
    """Where a colocated run records the engines whose memory it released (until they resume);
    :func:`~scope_megatron.rollout.weight_transfer.resume_released_engines` reads it."""
    return Path(run_dir) / "engines_released.json"


def default_verify_tolerance(dtype: torch.dtype) -> float:
    """Largest allowed mean |lp_engine - lp_trainer| over the probe when ``sync.verify_tolerance`` is unset."""
    return 1e-3 if dtype == torch.float32 else 0.1


def probe_statistics(engine_logprobs: list[float], trainer_logprobs: list[float]) -> tuple[float, float]:
    """(mean, max) of |engine - trainer| over the probe's response tokens."""
    if len(engine_logprobs) != len(trainer_logprobs) or not engine_logprobs:
        raise ValueError(f"probe log-probs of different or zero lengths: {len(engine_logprobs)} engine, "
                         f"{len(trainer_logprobs)} trainer")
    diffs = [abs(a - b) for a, b in zip(engine_logprobs, trainer_logprobs)]
    return sum(diffs) / len(diffs), max(diffs)


def make_probe(prompt_ids: list[int], answer_text: str, tokenizer: Any, probe_tokens: int) -> Probe:
    """The probe's prompt (the first prompt of the data) and its length: ``probe_tokens`` tokens.

    The response here (answer-like text) is only a placeholder of the right length: each check
    replaces it by the engine's greedy continuation of the prompt (:meth:`WeightSync._verify`).
    """
    response = list(tokenizer(f"The answer is \\boxed{{{answer_text}}}.", add_special_tokens=False)["input_ids"])
    response = (response * (1 + probe_tokens // max(len(response), 1)))[:probe_tokens]
    return Probe(prompt_ids=list(prompt_ids[-256:]), response_ids=response)


def trainer_probe_logprobs(model: Any, probe: Probe, vocab_size: int, device: torch.device) -> list[float]:
    """The trainer's log p(response | prompt) per response token, at temperature 1, on every rank.

    Under context parallelism the probe runs as a packed row split over the CP ranks (a padded
    row cannot be), and the CP ranks' log-probs are gathered back into order.
    """
    from megatron.core import parallel_state as ps

    from ..objective import vocab_parallel_logprobs
    from ..packing import gather_from_context_parallel, pack_sequences, shard_for_context_parallel

    from ..model.builder import sequence_length_multiple

    seq = probe.prompt_ids + probe.response_ids
    cp = ps.get_context_parallel_world_size()
    # sequence parallelism splits the row over the TP ranks: right padding (causal: the probe's
    # positions do not see it) makes its length a multiple
    sequence_parallel = bool(getattr(getattr(model, "config", None), "sequence_parallel", False))
    multiple = sequence_length_multiple(sequence_parallel, ps.get_tensor_model_parallel_world_size(), cp)
    tokens = torch.tensor([seq[:-1]], dtype=torch.long)
    targets = torch.tensor([seq[1:]], dtype=torch.long)
    if cp > 1:
        packed = pack_sequences([{"tokens": tokens[0], "targets": targets[0]}], seq_multiple=2 * cp,
                                total_multiple=multiple)
        mb: MicroBatch = shard_for_context_parallel(packed, cp, ps.get_context_parallel_rank())
    else:
        pad = -tokens.shape[1] % multiple
        tokens = torch.nn.functional.pad(tokens, (0, pad))
        targets = torch.nn.functional.pad(targets, (0, pad))
        mb = MicroBatch(tokens, TokenFields(targets=targets), 0)

    def output_fn(logits: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        return vocab_parallel_logprobs(logits, micro.fields.targets, vocab_size=vocab_size,
                                       check_finite=False).detach()

    outputs = run_forward(model, [mb], output_fn)
    r = len(probe.response_ids)
    values = torch.zeros(r, dtype=torch.float64, device=device)
    if outputs:
        lp = outputs[0]
        if cp > 1:  # a collective over the CP group: every CP rank of the last stage takes part
            lp = gather_from_context_parallel(lp, mb)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
                and ps.get_context_parallel_rank() == 0:
            start = len(probe.prompt_ids) - 1
            values = lp.reshape(-1)[start:start + r].to(device=device, dtype=torch.float64)
    dist.all_reduce(values)
    return values.tolist()


class WeightSync:
    """Export -> transfer -> verify, called on every rank after each optimizer step."""

    def __init__(self, *, model: Any, ddp_model: Any, arch: Any, control_group: Any, engine_urls: list[str] | None,
                 transport: str, bucket_bytes: int, disk_dir: str | Path, master_address: str, flattened_bucket: bool,
                 timeout_s: float, verify: bool, tolerance: float, probe: Probe | None, api_key: str | None,
                 log_path: Path | None, device: torch.device, node_engine_urls: list[str] | None = None,
                 local_world_size: int = 1):
        """``node_engine_urls`` (transport "tensor", colocated on several nodes, every rank): one
        student engine per node, in node order; node k's is fed by its own replica's root rank, the
        first rank of the node (:meth:`_sync_nodes`)."""
        self.model = model
        self.ddp_model = ddp_model
        self.arch = arch
        self.control_group = control_group
        self.verify = verify
        self.tolerance = tolerance  # largest allowed mean |lp_engine - lp_trainer| over the probe
        self.probe = probe  # prompt + placeholder response (its length is the continuation's)
        self.last_probe: Probe | None = None  # the probe of the last check (the greedy continuation)
        self.log_path = log_path
        self.device = device
        self.engine_urls = list(engine_urls or [])
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.transfer = None
        self.is_controller = dist.get_rank() == 0
        node_urls = [u.rstrip("/") for u in node_engine_urls or []]
        self.across_nodes = transport == "tensor" and len(node_urls) > 1
        if self.is_controller:
            from ..rollout.weight_transfer import WeightTransfer

            self.transfer = WeightTransfer(self.engine_urls, transport=transport, bucket_bytes=bucket_bytes,
                                           master_address=master_address, disk_dir=disk_dir,
                                           flattened_bucket=flattened_bucket, api_key=api_key,
                                           request_timeout_s=timeout_s, group_timeout_s=min(timeout_s, 600.0),
                                           group_record=None if log_path is None else
                                           Path(log_path).parent / "weight_update_group.json",
                                           released_record=None if log_path is None or transport != "tensor" else
                                           released_engines_record(Path(log_path).parent),
                                           tensor_urls=node_urls[:1] if self.across_nodes else None)
        # colocated on several nodes: which replica this rank exports with, and the node's feeder
        self.node = 0
        self.replica = 0
        self.is_feeder = self.is_controller
        self.node_sender = None  # the feeder of a node other than rank 0's: its engine's in-memory sender
        if self.across_nodes:
            self._plan_nodes(node_urls, local_world_size, bucket_bytes, flattened_bucket)

    def _plan_nodes(self, node_urls: list[str], local_world_size: int, bucket_bytes: int,
                    flattened_bucket: bool) -> None:
        """Every rank: node k's engine is fed by the replica that holds rank k * local_world_size,
        whose every rank must be on node k, rooted at that rank (config.check_colocated_nodes)."""
        from megatron.core import parallel_state as ps

        rank, world = dist.get_rank(), dist.get_world_size()
        mine = (ps.get_data_parallel_rank(with_context_parallel=True), ps.get_tensor_model_parallel_rank(),
                ps.get_pipeline_model_parallel_rank())
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine, group=self.control_group)
        self.node = rank // local_world_size
        first = self.node * local_world_size
        self.replica = everyone[first][0]
        members = [r for r, (replica, _, _) in enumerate(everyone) if replica == self.replica]
        if everyone[first][1:] != (0, 0) or any(r // local_world_size != self.node for r in members):
            raise SyncError(f"node {self.node}: the model replica of rank {first} (ranks {members}) is not "
                            f"rooted at it within the node of {local_world_size} ranks")
        self.is_feeder = rank == first
        box: list[Any] = [self.transfer.tensor_tp_sizes() if self.is_controller else None]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        if self.is_feeder and not self.is_controller:
            from ..rollout.tensor_transport import TensorWeightSender

            self.node_sender = TensorWeightSender(node_urls[self.node], bucket_bytes=bucket_bytes,
                                                  flattened_bucket=flattened_bucket, api_key=self.api_key,
                                                  tp_size=box[0][self.node], timeout_s=self.timeout_s)

    def close(self) -> None:
        if self.node_sender is not None:
            self.node_sender.close()
            self.node_sender = None
        if self.transfer is not None:
            try:
                self.transfer.close()
            except Exception as exc:  # engines may be gone already
                logger.warning("closing the weight transfer failed: %s", exc)
            self.transfer = None

    def _agree(self, error: str | None) -> None:
        """Share rank 0's outcome with every rank; raise SyncError everywhere on failure."""
        box = [error]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        if box[0] is not None:
            raise SyncError(box[0])

    def sync(self, step: int) -> SyncResult:
        from ..model import hf_io

        result = SyncResult()
        start = time.monotonic()
        if self.across_nodes:
            self._sync_nodes(step, result)
            result.seconds = time.monotonic() - start
            if self.verify and self.probe is not None:
                self._verify(step, result)
            return result
        error = None
        if self.is_controller:
            try:  # group formation (minutes on a slow join) before the export's NCCL collectives start
                self.transfer.connect()
            except Exception as exc:
                error = (f"weight sync of step {step} to the student engines {self.engine_urls} failed: "
                         f"{type(exc).__name__}: {exc}")
                logger.error("%s", error)
        # the other ranks wait here, on gloo with the control group's long timeout, not in an NCCL kernel
        dist.barrier(group=self.control_group)
        finish_param_sync(self.ddp_model)
        stream = hf_io.export_hf_tensors_to_rank0(self.model, self.arch)
        if self.is_controller and error is None:
            try:
                stats = self.transfer.update(stream, weight_version=step)
                result.num_bytes, result.num_tensors = stats.num_bytes, stats.num_tensors
                result.seconds_transfer = stats.seconds_transfer
            except Exception as exc:
                error = (f"weight sync of step {step} to the student engines {self.engine_urls} failed: "
                         f"{type(exc).__name__}: {exc}")
                logger.error("%s", error)
            for _ in stream:  # keep the other ranks' sends in step
                pass
        else:
            for _ in stream:  # yields nothing here: this rank sends its shards, or waits
                pass
        self._agree(error)
        result.seconds = time.monotonic() - start
        if self.verify and self.probe is not None:
            self._verify(step, result)
        return result

    def _sync_nodes(self, step: int, result: SyncResult) -> None:
        """Colocated on several nodes: rank 0 pauses every engine; every node's replica exports
        to its feeder (the node's first rank) at once, and each feeder hands its tensors to the
        engine on its node; every rank then learns every feeder's outcome, and rank 0 continues
        the engines. The pause and the outcomes travel outside the export, so no rank waits in a
        collective while another waits in the export's point-to-point sends."""
        from ..model import hf_io
        from ..rollout.weight_transfer import WeightUpdateStats

        version = str(step)
        where = f"weight sync of step {step} to the student engines {self.engine_urls or ''}"
        box: list[Any] = [None]
        if self.is_controller:
            try:
                self.transfer.pause()
            except Exception as exc:
                box[0] = f"{where} failed: {type(exc).__name__}: {exc}"
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        if box[0] is not None:
            if self.is_controller:
                self.transfer.continue_generation(raise_errors=False)
            logger.error("%s", box[0])
            raise SyncError(box[0])
        finish_param_sync(self.ddp_model)
        stream = hf_io.export_hf_tensors_to_replica_root(self.model, self.arch, replica=self.replica)
        failure = None
        sent = (0, 0)  # (tensors, bytes) this feeder handed to its node's engine
        transfer_start = time.monotonic()
        if self.is_feeder:
            try:
                if self.is_controller:
                    stats = WeightUpdateStats(weight_version=version)
                    self.transfer.send_tensors(stream, version, stats)
                    sent = (stats.num_tensors, stats.num_bytes)
                else:
                    done = self.node_sender.send(stream, weight_version=version)
                    sent = (int(done["tensors"]), int(done["bytes"]))
            except Exception as exc:
                url = self.node_sender.engine_url if self.node_sender is not None else "the first node's engine"
                failure = (f"node {self.node}: the in-memory weight update of {url} failed: "
                           f"{type(exc).__name__}: {exc}")
        for _ in stream:  # keep this replica's sends in step (a failed feeder drains the rest)
            pass
        result.seconds_transfer = time.monotonic() - transfer_start
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (self.node, self.is_feeder, failure, sent), group=self.control_group)
        error = "; ".join(f for _, _, f, _ in outcomes if f) or None
        fed = {node: count for node, feeder, _, count in outcomes if feeder}  # node -> (tensors, bytes)
        result.num_tensors, result.num_bytes = fed.get(0, (0, 0))
        if self.is_controller:
            logger.info("weight update %s in memory on %d nodes, each from its own replica: %s", version, len(fed),
                        ", ".join(f"node {n} {t} tensors {b / 2**20:.1f} MiB" for n, (t, b) in sorted(fed.items())))
            try:
                self.transfer.continue_generation(raise_errors=error is None)
                if error is None:
                    self.transfer.check_versions(version)
            except Exception as exc:
                error = f"{where} failed: {type(exc).__name__}: {exc}"
            if error is not None:
                logger.error("%s", error)
        self._agree(error)

    def _greedy_continuation(self) -> tuple[list[int] | None, str | None]:
        """Rank 0: the first student worker's greedy continuation of the probe prompt, or an error."""
        from ..rollout.client import BackgroundLoop, SGLangClient
        from ..rollout.protocol import SamplingParams

        url = self.engine_urls[0]
        # temperature 0 is greedy in SGLang (srt/sampling/sampling_params.py: top_k = 1); EOS does not end it
        sampling = SamplingParams(max_new_tokens=len(self.probe.response_ids), temperature=0.0, ignore_eos=True)

        async def generate():
            async with SGLangClient(url, api_key=self.api_key, timeout_s=self.timeout_s,
                                    max_concurrency=1) as client:
                return await client.generate(self.probe.prompt_ids, sampling, return_logprob=False)

        loop = BackgroundLoop("verify-sync-generate")
        try:
            ids = list(loop.run(generate()).output_ids)
        except Exception as exc:
            return None, (f"verify_sync: generating the probe continuation on student engine {url} failed: "
                          f"{type(exc).__name__}: {exc}")
        finally:
            loop.close()
        if not ids:
            return None, f"verify_sync: student engine {url} generated no token for the probe prompt"
        return ids, None

    def _verify(self, step: int, result: SyncResult) -> None:
        box: list[Any] = [None, None]
        if self.is_controller:
            box = list(self._greedy_continuation())
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        if box[1] is not None:
            raise SyncError(box[1])
        probe = Probe(prompt_ids=list(self.probe.prompt_ids), response_ids=list(box[0]))
        self.last_probe = probe
        ours = trainer_probe_logprobs(self.ddp_model, probe, self.arch.vocab_size, self.device)
        error = None
        if self.is_controller:
            from ..rollout.client import BackgroundLoop, SGLangClient

            records, worst, means = [], [], []
            loop = BackgroundLoop("verify-sync")
            try:
                for url in self.engine_urls:
                    async def score(u: str = url):
                        async with SGLangClient(u, api_key=self.api_key, timeout_s=self.timeout_s,
                                                max_concurrency=1) as client:
                            return await client.score(probe.prompt_ids, probe.response_ids)
                    try:
                        theirs = loop.run(score()).token_logprobs
                    except Exception as exc:
                        error = (f"verify_sync: scoring the probe on student engine {url} failed: "
                                 f"{type(exc).__name__}: {exc}")
                        break
                    mean_diff, max_diff = probe_statistics(theirs, ours)
                    worst.append(max_diff)
                    means.append(mean_diff)
                    records.append({"step": step, "engine": url, "engine_logprobs": theirs, "trainer_logprobs": ours,
                                    "mean_abs_diff": mean_diff, "max_abs_diff": max_diff,
                                    "tolerance": self.tolerance, "prompt_ids": probe.prompt_ids,
                                    "response_ids": probe.response_ids})
                    if not mean_diff <= self.tolerance:
                        error = (f"verify_sync: after the sync of step {step}, engine {url} scores the probe "
                                 f"differently from the trainer: mean |delta log p| = {mean_diff:.3g} over "
                                 f"{len(ours)} tokens > tolerance {self.tolerance:.3g} (max {max_diff:.3g}; "
                                 f"garbled weights? check the HF mapping / dtype)")
                        break
            finally:
                loop.close()
            if worst:
                result.probe_max_abs_diff, result.probe_mean_abs_diff = max(worst), max(means)
            if self.log_path is not None and records:
                with self.log_path.open("a") as f:
                    for rec in records:
                        f.write(json.dumps(rec) + "\n")
        box = [error, result.probe_max_abs_diff, result.probe_mean_abs_diff]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        result.probe_max_abs_diff, result.probe_mean_abs_diff = box[1], box[2]
        if box[0] is not None:
            raise SyncError(box[0])
