"""The SCOPE training loop (every rank runs :meth:`Trainer.run`; global rank 0 also controls).

One step:

1. rank 0 draws B prompts and :class:`~.controller.RolloutController` collects G rollouts each,
   teacher log-probs (overlapped) and rewards; the batch (or the error) is broadcast over a
   gloo control group with a long timeout (generation can take many minutes);
2. every rank builds the global per-trajectory tensors and its DP share of micro-batches
   (:mod:`.batching`), recomputes lp_old with a forward-only pass through megatron's schedule,
   and all-reduces the per-trajectory means;
3. ``plan_batch`` (routing, Eq. 4/5 weights, global denominators) and ``train_step`` with
   ``objective_loss`` per micro-batch (megatron's forward_backward_func, DDP, distributed
   optimizer, clipping, LR schedule); a step whose gradient norm is NaN/inf is skipped inside
   ``train_step`` and counted here, and too many abort the run;
4. weight sync to the student engines (``weight_version = step``) with the probe check;
5. metrics; a checkpoint every K steps; HF exports at chosen steps.

Stopping: SIGTERM / Ctrl-C set a flag that every rank checks (agreed by an all-reduce) at the
next step boundary, and so does a file ``RUN_DIR/STOP`` (rank 0 looks): checkpoint, engines
stopped, exit 0. A signal that arrives while rank 0 generates rollouts (the longest phase)
abandons the step at once: the in-flight requests are cancelled, the prompt sampler is rewound
so a resumed run draws the same prompts, and the checkpoint is the last completed step's. During
training and weight sync the step finishes first. A failing engine or sync ends the run with
:class:`TrainingAborted` (exit 1) and leaves the last checkpoint as it was.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, check_embedded_devices, check_world
from ..rollout.rewards import STATUSES
from ..rollout.types import RolloutBatch, Trajectory
from .batching import StepData, build_step_data
from .checkpointing import export_hf, load_checkpoint, resolve_resume, save_checkpoint
from .controller import EngineFailure, load_function
from .metrics import MetricsLogger, peak_tflops, training_flops
from .weight_sync import Probe, SyncError, WeightSync, make_probe

logger = logging.getLogger(__name__)

STOP_FILE = "STOP"  # RUN_DIR/STOP: checkpoint and exit 0 at the next step boundary (removed when honoured)
_POLL_S = 0.2       # how often rank 0 looks at the stop flag while rollouts are in flight


class TrainingAborted(RuntimeError):
    """The run cannot continue (engine failure, failed sync, too many bad steps)."""


class Trainer:
    def __init__(self, config: Config, config_yaml: str):
        self.cfg = config
        self.config_yaml = config_yaml
        self.stop_signal: int | None = None
        self.stop_reason: str | None = None  # what stopped the run (a signal's name, the STOP file)
        self.abandoned_step: int | None = None  # a step whose rollouts were abandoned by a stop
        self.servers: list[Any] = []
        self.controller = None
        self.reward_pool = None
        self.loop = None
        self.weight_sync: WeightSync | None = None
        self.metrics: MetricsLogger | None = None
        self.nonfinite_steps = 0
        self.empty_steps_in_a_row = 0
        self.empty_steps_total = 0
        self.last_saved_step = -1
        self._padding_hint_given = False
        self._engine_pool = None
        self._engine_futures: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _install_signals(self) -> None:
        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.stop_reason = signal.Signals(signum).name
            logger.warning("received %s: stopping (rollouts in flight are abandoned, a step in training or "
                           "sync finishes first; then checkpoint, engines stopped)", self.stop_reason)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def setup(self) -> None:
        from ..model import checkpoint as model_ckpt
        from ..model.arch import arch_from_hf_config, load_hf_config
        from ..model.builder import build_gpt_model, resolve_dtype
        from ..megatron_step import wrap_for_training
        from ..parallel import init_distributed, init_parallel, local_device

        cfg = self.cfg
        init_distributed(cfg.parallel.distributed_timeout_minutes)
        check_world(cfg, dist.get_world_size())
        check_embedded_devices(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                               int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.layout = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.seed, cp=cfg.parallel.cp,
                                    timeout_minutes=cfg.parallel.distributed_timeout_minutes)
        self.rank = self.layout.rank
        self.is_controller = self.rank == 0
        self.device = local_device()
        # rank 0 may spend many minutes generating while the others wait: a gloo group with a long timeout
        self.control_group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
        self.run_dir = Path(cfg.run_dir)
        if self.is_controller:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            stale = self.run_dir / STOP_FILE
            if stale.exists():  # left by a run that ended before honouring it: this run starts normally
                logger.warning("removing %s left from an earlier run (create it again to stop this run)", stale)
                stale.unlink(missing_ok=True)
        dist.barrier(group=self.control_group)
        self.dtype = resolve_dtype(cfg.model.dtype)  # auto: bf16 on CUDA, fp32 on CPU
        self.supervised = cfg.supervised
        if self.is_controller and cfg.embedded_teacher and not self.supervised:
            # the teacher engine loads while the student is built (it needs nothing from the trainer)
            t = cfg.teacher
            self._launch_embedded("teacher", (t.model, t.embedded_device, t.embedded_max_batch_size, "default"))

        student = Path(cfg.model.student)
        if (student / model_ckpt.META_FILE).is_file():
            self.arch, _ = model_ckpt.read_meta(student)
            self.hf_side_dir = student / model_ckpt.HF_SUBDIR
            from_hf = False
        elif (student / "config.json").is_file():
            self.arch = arch_from_hf_config(load_hf_config(student))
            self.hf_side_dir = student
            from_hf = True
        else:
            raise ConfigError("model.student", f"{cfg.model.student!r} is neither a converted checkpoint "
                              "(scope_megatron.json) nor an HF directory (config.json)")
        self.model = build_gpt_model(self.arch, params_dtype=self.dtype, impl=cfg.model.layer_impl,
                                     perform_initialization=False, recompute=cfg.model.recompute)
        if from_hf:
            from ..model.hf_io import HFWeightReader, load_hf_into_model

            reader = HFWeightReader(student, self.arch)
            reader.check_complete()
            load_hf_into_model(self.model, self.arch, reader)
        else:
            model_ckpt.load_model(self.model, student)
        o = cfg.optimizer
        updates = cfg.steps * cfg.algorithm.updates_per_batch
        self.ddp_model, self.optimizer, self.scheduler = wrap_for_training(
            self.model, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            lr_warmup_steps=o.lr_warmup_steps, lr_decay_style=o.lr_decay_style, lr_decay_steps=updates, min_lr=o.min_lr)
        self.objective = cfg.objective_config()
        # the teacher's top-k per response token, for the top-k KL term (0: not requested)
        self.teacher_topk = cfg.algorithm.topk_k if self.objective.topk_kl != "none" and not cfg.supervised else 0
        scale = cfg.algorithm.scale_logits_by_rollout_temperature and not self.supervised  # sft/kd: plain NLL
        self.logprob_temperature = cfg.rollout.temperature if scale else 1.0

        # resume
        self.step = 0
        trainer_state: dict[str, Any] = {}
        resume = resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir)
        if resume is not None:
            trainer_state = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.step = int(trainer_state["step"])
            self.nonfinite_steps = int(trainer_state.get("nonfinite_steps", 0))
            self.empty_steps_total = int(trainer_state.get("empty_steps_total", 0))
            self.last_saved_step = self.step
            logger.info("resumed from %s at step %d", resume, self.step)
        self.engine_version = self.step  # the weight version the student engines serve

        # data (rank 0)
        self.tokenizer = None
        probe: Probe | None = None
        if self.is_controller:
            from transformers import AutoTokenizer

            from ..rollout.data import PAPER_FORMAT, REFERENCE_CODE_FORMAT, PromptDataConfig, PromptDataset, PromptSampler

            self.tokenizer = AutoTokenizer.from_pretrained(self.hf_side_dir)
            fmt = PAPER_FORMAT if cfg.data.prompt_format == "paper" else REFERENCE_CODE_FORMAT
            self.dataset = PromptDataset(PromptDataConfig(
                paths=cfg.data.paths, problem_key=cfg.data.problem_key, answer_key=cfg.data.answer_key,
                id_key=cfg.data.id_key, prompt_format=fmt, max_prompt_tokens=cfg.data.max_prompt_tokens,
                limit=cfg.data.limit), self.tokenizer)
            self.sampler = PromptSampler(len(self.dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
            if "sampler" in trainer_state:
                self.sampler.load_state_dict(trainer_state["sampler"])
            if self.supervised:
                self._check_solutions()
            else:
                first = self.dataset[0]
                probe = make_probe(first.prompt_ids, first.answer, self.tokenizer, cfg.sync.probe_tokens)
        box = [probe]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        self.probe = box[0]

        if not self.supervised:
            self._start_engines()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_controller, tensorboard=cfg.logging.tensorboard,
                                     use_tqdm=cfg.logging.tqdm, total_steps=cfg.steps, start_step=self.step)
        self.peak = peak_tflops(cfg.logging.peak_tflops)

    def _check_solutions(self) -> None:
        """sft / kd: every record needs a non-empty solution (the target response)."""
        key = self.cfg.data.solution_key
        for rec in self.dataset.records:
            value = rec.extra.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError("data.solution_key", f"algorithm.preset={self.cfg.algorithm.preset!r} trains "
                                  f"on (prompt, solution) records: record {rec.record_id!r} has no string "
                                  f"{key!r} field")

    def _supervised_batch(self, step: int, records: list[Any]) -> RolloutBatch:
        """sft / kd: each record's solution (+ eos) is the response; reward 1 (the MLE path)."""
        t0 = time.monotonic()
        eos = self.tokenizer.eos_token_id
        key = self.cfg.data.solution_key
        trajectories = []
        for gi, rec in enumerate(records):
            ids = list(self.tokenizer(rec.extra[key], add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            trajectories.append(Trajectory(group=gi, prompt_index=rec.index, sample=0, prompt_ids=list(rec.prompt_ids),
                                           response_ids=ids, rollout_logprobs=[], teacher_logprobs=[0.0] * len(ids),
                                           reward=1.0, reward_status="correct", finish="stop",
                                           weight_version=str(self.engine_version)))
        return RolloutBatch(step=step, trajectories=trajectories, timings={"time/rollout": time.monotonic() - t0})

    def _start_engines(self) -> None:
        """Embedded engines (rank 0) where no URLs are configured; the weight-sync path; the controller."""
        cfg = self.cfg
        student_init = self.run_dir / "engines" / "student_hf"
        if cfg.embedded_student:
            # the engine starts from the trainer's current weights (a resumed run: the checkpoint's)
            export_hf(self.model, self.arch, student_init, self.hf_side_dir)
        worker_urls = None
        if self.is_controller:
            from ..rollout.client import BackgroundLoop
            from ..rollout.protocol import SamplingParams
            from ..rollout.rewards import MathRewardPool
            from .controller import RolloutController

            r, t = cfg.rollout, cfg.teacher
            if cfg.embedded_student:
                self._launch_embedded("student", (student_init, r.embedded_device, r.embedded_max_batch_size,
                                                  str(self.step)))
            handles = self._wait_embedded()
            if cfg.embedded_student:
                worker_urls, student_url = [handles["student"].url], handles["student"].url
            else:
                worker_urls = list(r.student_urls)
                student_url = r.student_router_url or worker_urls[0]
            teacher_url = handles["teacher"].url if cfg.embedded_teacher else (t.router_url or t.urls[0])
            self.loop = BackgroundLoop("scope-controller")
            if not cfg.algorithm.reward_function:
                self.reward_pool = MathRewardPool(num_workers=cfg.algorithm.reward_workers,
                                                  timeout_s=cfg.algorithm.reward_timeout_s)
                self.reward_pool.start()
            sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                      top_k=r.top_k)
            self.controller = RolloutController(
                student_url=student_url, teacher_url=teacher_url, group_size=r.group_size, sampling=sampling,
                seed=cfg.seed, seeded=r.seeded, tokenizer=self.tokenizer, reward_pool=self.reward_pool, loop=self.loop,
                api_key=r.api_key, max_concurrency=r.max_concurrency, teacher_max_concurrency=t.max_concurrency,
                request_timeout_s=r.request_timeout_s, max_retries=r.max_retries, retry_backoff_s=r.retry_backoff_s,
                reward_function=load_function(cfg.algorithm.reward_function) if cfg.algorithm.reward_function else None,
                teacher_topk=self.teacher_topk, student_vocab_size=self.arch.vocab_size)
            self.controller.wait_ready(timeout_s=600, recover_urls=() if cfg.embedded_student else worker_urls)
            # before any rollout: seeds honoured (rollout.seeded), the teacher reads the student's token ids
            from ..rollout.vocab import check_teacher_vocabulary

            self.controller.check_student_servers(worker_urls, require_deterministic=r.require_deterministic)
            check_teacher_vocabulary(self.tokenizer, student_name=str(cfg.model.student), tokenizer_dir=t.tokenizer,
                                     model_dir=t.model or None, model_info=self.controller.teacher_model_info,
                                     teacher_url=teacher_url)
        from ..parallel import resolve_master_address

        s = cfg.sync
        master_address = s.master_address
        if self.is_controller and s.transport == "distributed":
            master_address = resolve_master_address(s.master_address, worker_urls)
            logger.info("weight-update group: rank 0 binds %s (sync.master_address=%s)", master_address,
                        s.master_address)
        from .weight_sync import default_verify_tolerance

        tolerance = s.verify_tolerance or default_verify_tolerance(self.dtype)
        self.weight_sync = WeightSync(
            model=self.model, ddp_model=self.ddp_model, arch=self.arch, control_group=self.control_group,
            engine_urls=worker_urls, transport=s.transport, bucket_bytes=int(s.bucket_mb * 2**20),
            disk_dir=s.disk_dir or (self.run_dir / "weight_sync"), master_address=master_address,
            flattened_bucket=s.flattened_bucket, timeout_s=s.timeout_s, verify=s.verify, tolerance=tolerance,
            probe=self.probe, api_key=cfg.rollout.api_key, log_path=self.run_dir / "sync_probe.jsonl",
            device=self.device)
        if not cfg.embedded_student:
            # external servers: make them serve exactly the trainer's weights (a resumed run's included)
            self.weight_sync.sync(self.step)

    def _launch_embedded(self, role: str, spec: tuple) -> None:
        """Start an embedded engine as a local server process in the background (rank 0)."""
        from concurrent.futures import ThreadPoolExecutor

        from ..rollout.embedded_server import start_embedded_server_process
        from ..parallel import free_port

        engines_dir = self.run_dir / "engines"
        engines_dir.mkdir(parents=True, exist_ok=True)
        dtype = str(self.dtype).removeprefix("torch.")

        def start() -> Any:
            model_dir, device, max_batch, version = spec
            args = ["--dtype", dtype, "--max-batch-size", str(max_batch), "--random-seed", str(self.cfg.seed),
                    "--weight-version", version, "--log-level", "warning"]
            if device:
                args += ["--device", device]
            if self.cfg.rollout.seeded:  # sampling_seed is honoured only in deterministic mode
                args.append("--enable-deterministic-inference")
            handle = start_embedded_server_process(model_dir, free_port(), extra_args=args,
                                                   log_path=engines_dir / f"{role}.log", ready_timeout=300)
            (engines_dir / f"{role}.pid").write_text(str(handle.process.pid))
            logger.info("embedded %s engine (pid %d) at %s", role, handle.process.pid, handle.url)
            return handle

        if self._engine_pool is None:
            self._engine_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="engine-start")
        self._engine_futures[role] = self._engine_pool.submit(start)

    def _wait_embedded(self) -> dict[str, Any]:
        """Wait for the launched engines; every started one is registered for shutdown."""
        handles, first_error = {}, None
        for role, future in list(self._engine_futures.items()):
            try:
                handles[role] = future.result()
                self.servers.append(handles[role])
            except Exception as exc:
                first_error = first_error or RuntimeError(f"the embedded {role} engine did not start: {exc}")
            del self._engine_futures[role]
        if first_error is not None:
            raise first_error
        return handles

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        self._install_signals()
        try:
            self.setup()
            if self.cfg.eval.every and self.cfg.eval.at_start and self.step == 0:
                self.metrics.log(0, self._evaluate(0), count_step=False)
            while self.step < self.cfg.steps:
                if self._stop_agreed():
                    break
                self.step += 1
                if not self._train_one_step(self.step):  # rollouts abandoned: the model is the last step's
                    self.step -= 1
                    break
            if self.step > self.last_saved_step and (self.cfg.checkpoint.save_at_end or self.stop_signal is not None):
                self._save(self.step)
            if self.stop_signal is not None:
                logger.warning("stopped by %s after step %d%s; checkpoint of step %d saved", self.stop_reason,
                               self.step, f" (rollouts of step {self.abandoned_step} abandoned)"
                               if self.abandoned_step is not None else "", self.step)
                if self.is_controller and self.stop_reason == STOP_FILE:
                    (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # honoured: a resumed run continues
            return 0
        finally:
            self.shutdown()

    def _stop_agreed(self) -> bool:
        """Every rank's stop flag (and rank 0's RUN_DIR/STOP file), agreed at a step boundary."""
        if self.is_controller and self.stop_signal is None and (self.run_dir / STOP_FILE).exists():
            logger.warning("%s exists: stopping (checkpoint, engines stopped)", self.run_dir / STOP_FILE)
            self.stop_signal, self.stop_reason = signal.SIGTERM, STOP_FILE
        flag = torch.tensor([1 if self.stop_signal is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        if int(flag.item()) and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
            self.stop_reason = "another rank's stop"
        return bool(flag.item())

    def _release_engines(self) -> None:
        """Close the weight sync and the controller, stop the embedded engines (idempotent)."""
        if self.weight_sync is not None:
            self.weight_sync.close()
            self.weight_sync = None
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        if self._engine_futures:  # engines still starting when setup failed
            try:
                self._wait_embedded()
            except Exception:
                pass
        if self._engine_pool is not None:
            self._engine_pool.shutdown(wait=False)
            self._engine_pool = None
        for handle in self.servers:  # signal all first, so they exit concurrently
            if getattr(handle, "process", None) is not None and handle.process.poll() is None:
                handle.process.terminate()
        for handle in self.servers:
            try:
                handle.stop()
            except Exception as exc:
                logger.warning("stopping an engine failed: %s", exc)
        self.servers.clear()

    def shutdown(self) -> None:
        """Stop the engines and helpers of this rank (idempotent; also after errors)."""
        self._release_engines()
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # ------------------------------------------------------------------ one step
    def _rollouts(self, step: int) -> RolloutBatch | None:
        """Rank 0 collects the step's batch and broadcasts it; None on every rank when a stop
        abandoned the collection (the sampler is then back where the step started)."""
        payload: list[Any] = [None]
        if self.is_controller:
            sampler_state = self.sampler.state_dict()
            records = [self.dataset[i] for i in self.sampler.next_indices(self.cfg.rollout.prompts_per_step)]
            try:
                if self.supervised:
                    payload[0] = ("ok", self._supervised_batch(step, records))
                else:
                    batch = self._collect_unless_stopped(step, records)
                    payload[0] = ("ok", batch) if batch is not None else ("stop", None)
            except Exception as exc:  # anything on rank 0 must not leave the others waiting
                if self.stop_signal is not None:  # e.g. the signal also reached the engines
                    payload[0] = ("stop", None)
                elif isinstance(exc, EngineFailure):
                    payload[0] = ("error", str(exc))
                else:
                    payload[0] = ("error", f"rollout failed at step {step}: {type(exc).__name__}: {exc}")
            if payload[0][0] == "stop":
                self.sampler.load_state_dict(sampler_state)  # a resumed run draws these prompts again
                logger.warning("step %d: rollouts abandoned (%s)", step, self.stop_reason)
                # engines still busy with the cancelled requests would slow the checkpoint down
                self._release_engines()
        dist.broadcast_object_list(payload, src=0, group=self.control_group)
        status, value = payload[0]
        if status == "stop":
            self.abandoned_step = step
            if self.stop_signal is None:
                self.stop_signal, self.stop_reason = signal.SIGTERM, "another rank's stop"
            return None
        if status != "ok":
            raise TrainingAborted(value)
        return value

    def _collect_unless_stopped(self, step: int, records: list[Any]) -> RolloutBatch | None:
        """The controller's collection, cancelled (every in-flight request) as soon as a stop
        signal arrives; None then."""
        from concurrent.futures import CancelledError, TimeoutError as FutureTimeout

        if self.stop_signal is not None:
            return None
        logger.info("step %d: collecting rollouts of %d prompts x %d", step, len(records), self.cfg.rollout.group_size)
        future = self.controller.submit(step, records)
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                if self.stop_signal is not None:
                    future.cancel()  # cancels the step's task group on the client loop: requests closed
                    try:
                        future.result(timeout=10)
                    except (CancelledError, FutureTimeout, Exception):
                        pass
                    return None

    def _old_logprobs(self, data: StepData) -> torch.Tensor:
        """lp_old per token (stored in each micro-batch on the last stage) and per-trajectory means [N].

        The means are sums over each trajectory's response tokens divided by its response length:
        the sums add up over micro-batches, DP ranks and (context parallelism) the CP ranks that
        each hold part of a packed trajectory; one TP rank per group contributes.
        """
        from megatron.core import parallel_state as ps

        from ..megatron_step import run_forward
        from ..objective import vocab_parallel_logprobs

        vocab, temperature = self.arch.vocab_size, self.logprob_temperature

        def output_fn(logits, mb):
            return vocab_parallel_logprobs(logits, mb.extras["targets"], vocab_size=vocab, temperature=temperature,
                                           check_finite=False).detach()

        outputs = run_forward(self.ddp_model, data.micro_batches, output_fn)
        sums = torch.zeros(data.num_trajectories, dtype=torch.float64)
        for mb, lp in zip(data.micro_batches, outputs):
            lp = lp.cpu()
            mb.extras["old_lp"] = lp  # [b, s] padded, [1, T / cp] packed
            mask = mb.extras["mask"]
            if "token_trajectory" in mb.extras:  # packed: each token's trajectory within the micro-batch
                trajectory = mb.extras["rows"][mb.extras["token_trajectory"]]
            else:
                trajectory = mb.extras["rows"][:, None].expand_as(mask)
            sums.index_add_(0, trajectory[mask], lp[mask].double())
        if ps.get_tensor_model_parallel_rank() != 0:
            sums.zero_()
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        return (sums.cpu() / data.response_lengths.double())

    def _loss_fn(self, plan):
        from ..objective import objective_loss, vocab_parallel_logprobs, vocab_parallel_topk_kl

        vocab, temperature, objective = self.arch.vocab_size, self.logprob_temperature, self.objective
        supervised = self.supervised
        use_topk = self.teacher_topk > 0

        def loss_fn(logits, mb):
            topk = None
            if use_topk:  # one pass over the logits: sampled-token log-probs and the top-k KL per token
                out = vocab_parallel_topk_kl(logits, mb.extras["targets"], mb.extras["teacher_topk_ids"],
                                             mb.extras["teacher_topk_lp"], vocab_size=vocab,
                                             direction=objective.topk_kl, tail=objective.topk_tail,
                                             temperature=temperature, return_entropy=True, check_finite=False)
                lp, topk, entropy = out.target_logprobs, out.topk_kl, out.entropy
            else:
                lp, entropy = vocab_parallel_logprobs(logits, mb.extras["targets"], vocab_size=vocab,
                                                      temperature=temperature, return_entropy=True, check_finite=False)
            coefficients = plan.select(mb.extras["rows"].cpu()).to(logits.device)
            out = objective_loss(objective, coefficients, plan.denominators, logprobs=lp, response_mask=mb.extras["mask"],
                                 old_logprobs=mb.extras.get("old_lp"),
                                 teacher_logprobs=None if supervised else mb.extras["teacher_lp"],
                                 rollout_logprobs=None if supervised else mb.extras["rollout_lp"], entropy=entropy,
                                 topk_kl=topk, token_trajectory=mb.extras.get("token_trajectory"), check_finite=False)
            return out.loss, out.metrics

        return loss_fn

    def _train_one_step(self, step: int) -> bool:
        """One step on every rank; False when a stop abandoned its rollouts (nothing was trained)."""
        from ..megatron_step import train_step
        from ..objective import plan_batch

        cfg = self.cfg
        t_step = time.monotonic()
        batch = self._rollouts(step)
        if batch is None:
            return False
        if self.is_controller and cfg.logging.save_rollouts:
            self._save_rollouts(batch)
        metrics: dict[str, float] = dict(batch.timings)
        metrics.update(self._batch_metrics(batch, step))
        p = cfg.parallel
        try:  # every rank sees the same batch, so every rank fails the same way
            data = build_step_data(batch.trajectories, dp=self.layout.dp, dp_rank=self.layout.dp_rank,
                                   micro_batch_size=p.micro_batch_size, pad_id=0,
                                   filter_uniform_groups=cfg.algorithm.filter_uniform_groups,
                                   max_tokens_per_microbatch=p.max_tokens_per_microbatch, cp_size=self.layout.cp,
                                   cp_rank=self.layout.cp_rank, oversize=p.oversize_sequences,
                                   teacher_topk=self.teacher_topk)
        except ValueError as exc:
            raise TrainingAborted(f"step {step}: {exc}") from exc
        if data is None:
            self.empty_steps_in_a_row += 1
            self.empty_steps_total += 1
            logger.warning("step %d: every group was filtered out (%d trajectories); step skipped", step,
                           len(batch.trajectories))
            if self.empty_steps_in_a_row >= cfg.faults.max_empty_steps:
                raise TrainingAborted(f"{self.empty_steps_in_a_row} consecutive steps had no usable trajectory "
                                      f"(faults.max_empty_steps = {cfg.faults.max_empty_steps})")
            metrics.update({"train/skipped_empty_total": self.empty_steps_total, "time/step": time.monotonic() - t_step})
            self._finish_step(step, metrics)
            return True
        self.empty_steps_in_a_row = 0
        metrics["data/filtered_empty_responses"] = data.dropped["empty_responses"]
        metrics["data/filtered_uniform_groups"] = data.dropped["uniform_groups"]
        metrics["train/micro_batches"] = data.num_micro_batches
        metrics["train/padding_fraction"] = data.padding_fraction
        if (self.is_controller and not self._padding_hint_given and p.max_tokens_per_microbatch is None
                and data.padding_fraction > 0.25):
            self._padding_hint_given = True
            logger.info("step %d: %.0f%% of the trained positions are padding; packed micro-batches avoid it "
                        "(set parallel.max_tokens_per_microbatch, e.g. the longest prompt + response)", step,
                        100 * data.padding_fraction)

        t0 = time.monotonic()
        if self.supervised:  # MLE on given text: no old policy, no teacher scores
            student_mean, teacher_mean = None, None
            finite = True
        else:
            student_mean = self._old_logprobs(data)
            teacher_mean = data.teacher_logprob_mean.float()
            finite = bool(torch.isfinite(student_mean).all()) and bool(torch.isfinite(teacher_mean).all())
            student_mean = student_mean.float()
        metrics["time/old_logprobs"] = time.monotonic() - t0
        updated = False
        t0 = time.monotonic()
        if not finite:
            self._count_nonfinite(step, "non-finite student or teacher log-probs")
        else:
            plan = plan_batch(self.objective, group_ids=data.group_ids, response_lengths=data.response_lengths,
                              correct=data.correct, student_logprob_mean=student_mean,
                              teacher_logprob_mean=teacher_mean, rewards=data.rewards)
            metrics.update({f"objective/{k}": v for k, v in plan.metrics.items()})
            loss_fn = self._loss_fn(plan)
            for update in range(cfg.algorithm.updates_per_batch):
                result = train_step(self.ddp_model, self.optimizer, self.scheduler, data.micro_batches, loss_fn)
                if not result.update_successful or not math.isfinite(result.loss):
                    self._count_nonfinite(step, f"loss {result.loss}, grad norm {result.grad_norm}")
                    break
                updated = True
                if update == 0:
                    metrics.update(result.report)
                    metrics["loss/total"] = result.loss
                    metrics["train/grad_norm"] = result.grad_norm
                    metrics["train/lr"] = result.learning_rate
                    metrics["train/loss_tokens"] = result.num_loss_tokens
        metrics["time/train"] = time.monotonic() - t0
        metrics["train/skipped_nonfinite_total"] = self.nonfinite_steps
        metrics["train/skipped_empty_total"] = self.empty_steps_total

        t0 = time.monotonic()
        if updated and self.weight_sync is not None:
            try:
                sync = self.weight_sync.sync(step)
            except SyncError as exc:
                raise TrainingAborted(str(exc)) from exc
            self.engine_version = step
            metrics.update({"sync/seconds": sync.seconds, "sync/transfer_seconds": sync.seconds_transfer,
                            "sync/bytes": sync.num_bytes, "sync/tensors": sync.num_tensors})
            if sync.probe_max_abs_diff == sync.probe_max_abs_diff:  # not NaN
                metrics["sync/probe_max_abs_diff"] = sync.probe_max_abs_diff
                metrics["sync/probe_mean_abs_diff"] = sync.probe_mean_abs_diff
        metrics["time/sync"] = time.monotonic() - t0

        # throughput and MFU over the trainer's ranks
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in data.trajectories)
        step_time = time.monotonic() - t_step
        flops = training_flops(self.arch.num_parameters, tokens, tokens, cfg.algorithm.updates_per_batch if updated else 0)
        peak = self.peak * 1e12 * self.layout.world_size
        metrics["perf/tokens_per_s"] = tokens / max(step_time, 1e-9)
        metrics["perf/mfu"] = flops / max(step_time * peak, 1e-9)
        metrics["perf/train_mfu"] = flops / max((metrics["time/old_logprobs"] + metrics["time/train"]) * peak, 1e-9)
        metrics["perf/tflops_per_device"] = flops / max(step_time, 1e-9) / self.layout.world_size / 1e12
        metrics["time/step"] = step_time
        if self._eval_due(step):
            metrics.update(self._evaluate(step))
        self._finish_step(step, metrics)
        return True

    def _save_rollouts(self, batch: RolloutBatch) -> None:
        """One JSON line per trajectory (every Trajectory field, plus ``correct``) to RUN_DIR/rollouts/step_N.jsonl."""
        import dataclasses
        import json

        out = self.run_dir / "rollouts" / f"step_{batch.step:08d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".jsonl.partial")
        with partial.open("w") as f:
            for t in batch.trajectories:
                f.write(json.dumps({**dataclasses.asdict(t), "correct": t.correct}) + "\n")
        partial.replace(out)

    def _eval_due(self, step: int) -> bool:
        e = self.cfg.eval
        return bool(e.every) and (step % e.every == 0 or step == self.cfg.steps)

    def _evaluate(self, step: int) -> dict[str, float]:
        """In-training evaluation of the student engine (which serves the weights of ``step``), rank 0;
        ``eval/<benchmark>/avg@k`` etc. (scope_megatron.evaluation.evaluate). Other ranks wait."""
        scalars: dict[str, float] = {}
        if self.is_controller:
            from ..evaluation.runner import EvalSettings, evaluate

            e = self.cfg.eval
            ks = tuple(sorted(set(e.ks))) if e.ks else tuple(sorted({1, e.n}))
            settings = EvalSettings(n=e.n, ks=ks, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                                    max_new_tokens=e.max_new_tokens, seed=self.cfg.seed)
            reward_fn = self.controller.reward_function
            scalars = evaluate(self.controller.student, e.benchmarks, self.tokenizer, settings=settings,
                               reward_pool=None if reward_fn else self.reward_pool, reward_fn=reward_fn,
                               loop=self.loop, limit=e.limit,
                               out_dir=self.run_dir / "eval" / f"step_{step:08d}")
            logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in sorted(scalars.items())
                                                              if "avg@" in k or "pass@" in k))
        dist.barrier(group=self.control_group)
        return scalars

    def _count_nonfinite(self, step: int, why: str) -> None:
        self.nonfinite_steps += 1
        logger.warning("step %d skipped: %s (%d NaN/inf steps so far)", step, why, self.nonfinite_steps)
        if self.nonfinite_steps > self.cfg.faults.max_nonfinite_steps:
            raise TrainingAborted(f"{self.nonfinite_steps} steps with NaN/inf loss or gradients "
                                  f"(faults.max_nonfinite_steps = {self.cfg.faults.max_nonfinite_steps})")

    def _finish_step(self, step: int, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        k = cfg.checkpoint
        t0 = time.monotonic()
        if k.every and step % k.every == 0:
            self._save(step)
        if step in k.export_hf_steps or (k.export_hf_every and step % k.export_hf_every == 0):
            export_hf(self.model, self.arch, self.run_dir / "hf" / f"step_{step:08d}", self.hf_side_dir)
        metrics["time/checkpoint"] = time.monotonic() - t0
        if self.is_controller:
            metrics["data/epoch"] = self.sampler.epoch
        self.metrics.log(step, metrics)

    def _save(self, step: int) -> None:
        trainer_state = {"nonfinite_steps": self.nonfinite_steps, "empty_steps_total": self.empty_steps_total}
        if self.is_controller:
            trainer_state["sampler"] = self.sampler.state_dict()
        save_checkpoint(self.cfg.checkpoint_dir, step, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, arch=self.arch, hf_side_dir=self.hf_side_dir, dtype=self.dtype,
                        trainer_state=trainer_state, config_yaml=self.config_yaml, keep_last=self.cfg.checkpoint.keep_last)
        self.last_saved_step = step
        logger.info("checkpoint of step %d written to %s", step, self.cfg.checkpoint_dir)

    def _batch_metrics(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        trajs = batch.trajectories
        n = max(len(trajs), 1)
        lengths = [len(t.response_ids) for t in trajs] or [0]
        metrics = {
            "reward/mean": sum(t.reward for t in trajs) / n,
            "reward/accuracy": sum(t.correct for t in trajs) / n,
            "response/length_mean": sum(lengths) / len(lengths),
            "response/length_max": max(lengths),
            "response/length_min": min(lengths),
            "response/truncation_rate": sum(t.truncated for t in trajs) / n,
            "prompt/length_mean": sum(len(t.prompt_ids) for t in trajs) / n,
            "rollout/trajectories": len(trajs),
            "rollout/stale_fraction": sum(t.weight_version != str(self.engine_version) for t in trajs) / n,
        }
        for status in STATUSES:
            metrics[f"reward/status_{status}"] = sum(t.reward_status == status for t in trajs) / n
        gen = batch.timings.get("time/generate", 0.0)
        metrics["perf/rollout_tokens_per_s"] = sum(lengths) / max(gen, 1e-9)
        return metrics
