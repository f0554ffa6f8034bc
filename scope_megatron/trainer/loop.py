"""The SCOPE training loop (every rank runs :meth:`Trainer.run`; global rank 0 also controls).

One step (:meth:`Trainer._train_one_step`):

1. **rollout** -- rank 0 draws B prompts; the controller collects G rollouts each, teacher
   log-probs (overlapped) and rewards; every rank receives the batch (:mod:`.rollout_source`);
2. **batch** -- every rank builds the global per-trajectory tensors and its DP share of
   micro-batches (:mod:`.batching`);
3. **old log-probs** -- a forward-only pass through megatron's schedule gives lp_old per token
   and the per-trajectory means, all-reduced (:class:`.learner.Learner`); GRPO with its KL to
   the initial policy also runs the frozen reference model forward;
4. **plan** -- routing by correctness, the Eq. 4/5 weights and the global denominators
   (:func:`scope_megatron.objective.plan_batch`);
5. **update** -- ``train_step`` with the objective's loss per micro-batch (megatron's
   forward_backward_func, DDP, distributed optimizer, clipping, LR schedule); a step whose loss
   or gradient norm is NaN/inf is skipped and counted in :class:`.state.RunState`;
6. **sync** -- the new weights go to the student engines (``weight_version = step``), checked on
   a probe (:mod:`.weight_sync`);
7. **record** -- metrics (:mod:`.step_metrics`), a checkpoint every K steps, HF exports.

Stopping: SIGTERM / Ctrl-C and ``RUN_DIR/STOP`` set a flag that every rank agrees on at the
next step boundary (:class:`.state.StopRequest`): checkpoint, engines stopped, exit 0. A stop
during generation abandons the step at once (the checkpoint is the last completed step's);
during training and weight sync the step finishes first. A failing engine or sync ends the run
with :class:`TrainingAborted` (exit 1) and leaves the last checkpoint as it was.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, check_colocated_nodes, check_embedded_devices, check_world
from ..parallel import Layout
from ..rollout.types import RolloutBatch
from ..rollout.weight_transfer import resume_released_engines
from .batching import StepData, build_step_data
from .checkpointing import CheckpointManager, load_checkpoint, resolve_resume
from .colocation import Colocation
from .engines import EmbeddedEngines, RolloutServices, embedded_engine_config, teacher_role
from .learner import Learner, student_format
from .metrics import MetricsLogger
from .rollout_source import RolloutSource
from .state import STOP_FILE, RunState, StopRequest, TrainingAborted
from .step_metrics import StepRecorder, StepTimer, batch_metrics
from .weight_sync import Probe, SyncError, WeightSync, default_verify_tolerance, make_probe, released_engines_record

__all__ = ["STOP_FILE", "Trainer", "TrainingAborted"]

logger = logging.getLogger(__name__)


def _finite_means(data: StepData, old: Any) -> bool:
    """Both per-trajectory means the SCOPE weights use are finite."""
    return bool(torch.isfinite(old.trajectory_means).all()) and bool(torch.isfinite(data.teacher_logprob_mean).all())


def _plan_inputs(data: StepData, old: Any | None) -> dict[str, Any]:
    """``plan_batch``'s per-trajectory inputs [N]; sft / kd (``old`` None) have no log-prob means."""
    return dict(group_ids=data.group_ids, response_lengths=data.response_lengths, correct=data.correct,
                rewards=data.rewards,
                student_logprob_mean=None if old is None else old.trajectory_means.float(),
                teacher_logprob_mean=None if old is None else data.teacher_logprob_mean.float())


class Trainer:
    """Builds the run's components in :meth:`setup` and runs the loop in :meth:`run`.

    Attributes marked *rank 0* are ``None`` on every other rank."""

    cfg: Config
    config_yaml: str
    layout: Layout                        # this rank's place in TP x PP x CP x DP
    is_controller: bool                   # global rank 0
    device: torch.device
    dtype: torch.dtype
    control_group: Any                    # gloo, long timeout: the batch, stop flags, sync agreement
    run_dir: Path
    state: RunState
    stop: StopRequest
    learner: Learner
    rollouts: RolloutSource
    recorder: StepRecorder
    metrics: MetricsLogger | None
    checkpoints: CheckpointManager | None
    weight_sync: WeightSync | None        # None for sft / kd (no engines)
    colocation: Colocation | None         # placement: colocated
    engine_version: int                   # the weight version the student engines serve
    last_saved_step: int
    student_engine_from_hf: bool          # the embedded student engine loads model.student itself
    # rank 0
    engines: EmbeddedEngines | None
    services: RolloutServices | None
    dataset: Any
    tokenizer: Any

    def __init__(self, config: Config, config_yaml: str):
        self.cfg = config
        self.config_yaml = config_yaml
        self.state = RunState()
        self.stop = StopRequest(run_dir=Path(config.run_dir), is_controller=False)
        self.metrics = None
        self.checkpoints = None
        self.weight_sync = None
        self.colocation = None
        self.engines = None
        self.services = None
        self.dataset = None
        self.tokenizer = None
        self.engine_version = 0
        self.last_saved_step = -1
        self.student_engine_from_hf = False

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from ..model.builder import resolve_dtype
        from ..parallel import init_distributed, init_parallel, local_device

        cfg = self.cfg
        init_distributed(cfg.parallel.distributed_timeout_minutes)
        check_world(cfg, dist.get_world_size())
        check_colocated_nodes(cfg, dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        check_embedded_devices(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                               int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.is_controller = dist.get_rank() == 0
        self.stop.is_controller = self.is_controller
        self.run_dir = Path(cfg.run_dir)
        self.dtype = resolve_dtype(cfg.model.dtype)  # auto: bf16 on CUDA, fp32 on CPU
        engine_dtype = str(self.dtype).removeprefix("torch.")
        resume = resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir)
        # a fresh run from an HF directory: the embedded student engine reads the very weights the
        # trainer loads, so it starts now instead of from an export of them
        self.student_engine_from_hf = (cfg.uses_engines and cfg.embedded_student and resume is None
                                       and student_format(cfg.model.student) == "hf")
        if self.is_controller:  # embedded engines load while megatron-core is imported and the student built
            self.engines = EmbeddedEngines(self.run_dir / "engines")
            teachers = cfg.teacher.servers().items() if cfg.uses_engines else ()
            for name, server in teachers:
                if not server.urls:
                    role = teacher_role(name)
                    self.engines.launch(role, embedded_engine_config(cfg, role, server.model, engine_dtype, "default"))
            if self.student_engine_from_hf:
                self.engines.launch("student", embedded_engine_config(cfg, "student", cfg.model.student,
                                                                      engine_dtype, "0"))
        self.layout = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.seed, cp=cfg.parallel.cp,
                                    timeout_minutes=cfg.parallel.distributed_timeout_minutes)
        self.device = local_device()
        # rank 0 may spend many minutes generating while the others wait: a gloo group with a long timeout
        self.control_group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
        if self.is_controller:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            self.stop.remove_stale_file()
        dist.barrier(group=self.control_group)
        self.learner = Learner(cfg, self.dtype, self.device)
        if self.is_controller and not cfg.data.replay:  # a replay's prompts come with its rollouts
            self._load_data()
        if resume is not None:
            self.state.load_state_dict(load_checkpoint(resume, **self.learner.checkpoint_parts(),
                                                       fully_parallel=cfg.checkpoint.fully_parallel))
            self.last_saved_step = self.state.step
            logger.info("resumed from %s at step %d", resume, self.state.step)
        self.engine_version = self.state.step
        if cfg.uses_engines:
            self._connect_engines(engine_dtype)
        self.rollouts = RolloutSource(cfg, state=self.state, stop=self.stop, control_group=self.control_group,
                                      is_controller=self.is_controller, dataset=self.dataset,
                                      tokenizer=self.tokenizer,
                                      controller=self.services.controller if self.services else None,
                                      on_abandon=self._release_engines, vocab_size=self.learner.arch.vocab_size,
                                      teacher_topk=self.learner.teacher_topk)
        self.recorder = StepRecorder(num_parameters=self.learner.arch.num_parameters,
                                     world_size=self.layout.world_size,
                                     updates_per_batch=cfg.algorithm.updates_per_batch,
                                     configured_peak_tflops=cfg.logging.peak_tflops, is_controller=self.is_controller,
                                     packing=cfg.parallel.max_tokens_per_microbatch is not None)
        self.checkpoints = CheckpointManager.from_config(cfg)
        self.metrics = MetricsLogger.from_config(cfg, self.run_dir, enabled=self.is_controller,
                                                 start_step=self.state.step)

    def _load_data(self) -> None:
        """Rank 0: tokenizer, prompt dataset and sampler (its position comes with a resume)."""
        from transformers import AutoTokenizer

        from ..rollout.data import PAPER_FORMAT, REFERENCE_CODE_FORMAT, PromptDataConfig, PromptDataset, PromptSampler

        d = self.cfg.data
        self.tokenizer = AutoTokenizer.from_pretrained(self.learner.hf_side_dir)
        fmt = PAPER_FORMAT if d.prompt_format == "paper" else REFERENCE_CODE_FORMAT
        try:
            self.dataset = PromptDataset(PromptDataConfig(
                paths=d.paths, problem_key=d.problem_key, answer_key=d.answer_key, id_key=d.id_key,
                prompt_format=fmt, max_prompt_tokens=d.max_prompt_tokens, limit=d.limit, source_key=d.source_key),
                self.tokenizer)
        except FileNotFoundError as exc:
            raise ConfigError("data.paths", str(exc)) from exc
        self.state.sampler = PromptSampler(len(self.dataset), seed=self.cfg.seed, shuffle=d.shuffle)
        if self.cfg.supervised:
            self._check_solutions()

    def _check_solutions(self) -> None:
        """sft / kd: every record needs a non-empty solution (the target response)."""
        key = self.cfg.data.solution_key
        for rec in self.dataset.records:
            value = rec.extra.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError("data.solution_key", f"algorithm.preset={self.cfg.algorithm.preset!r} trains "
                                  f"on (prompt, solution) records: record {rec.record_id!r} has no string "
                                  f"{key!r} field")

    def _connect_engines(self, engine_dtype: str) -> None:
        """Embedded engines (rank 0) where no URLs are configured, the controller, and the weight
        sync (every rank); external servers are then made to serve exactly the trainer's weights."""
        from ..parallel import resolve_master_address

        cfg, s = self.cfg, self.cfg.sync
        student_init = self.run_dir / "engines" / "student_hf"
        # unless it started in setup, the engine starts from the trainer's weights (a resumed run's,
        # or those of a converted checkpoint)
        exported = cfg.embedded_student and not self.student_engine_from_hf
        if exported:
            self.learner.export_hf(student_init)
        probe: list[Probe | None] = [None]
        master_address = s.master_address
        if self.is_controller:
            if exported:
                self.engines.launch("student", embedded_engine_config(cfg, "student", student_init, engine_dtype,
                                                                      str(self.state.step)))
            if cfg.placement == "colocated" and not cfg.embedded_student:
                # servers that outlived a trainer killed during training are still released:
                # resumed before anything (the readiness probe included) reaches them
                for line in resume_released_engines(released_engines_record(self.run_dir), cfg.rollout.student_urls,
                                                    api_key=cfg.rollout.api_key):
                    logger.warning("colocated engine recovery: %s", line)
            self.services = RolloutServices.connect(cfg, self.engines, tokenizer=self.tokenizer,
                                                    vocab_size=self.learner.arch.vocab_size,
                                                    teacher_topk=self.learner.teacher_topk)
            first = self.dataset[0]
            probe[0] = make_probe(first.prompt_ids, first.answer, self.tokenizer, s.probe_tokens)
            if s.transport == "distributed":
                master_address = resolve_master_address(s.master_address, self.services.worker_urls)
                logger.info("weight-update group: rank 0 binds %s (sync.master_address=%s)", master_address,
                            s.master_address)
        dist.broadcast_object_list(probe, src=0, group=self.control_group)
        learner = self.learner
        colocated = cfg.placement == "colocated"
        self.weight_sync = WeightSync(
            model=learner.model, ddp_model=learner.ddp_model, arch=learner.arch, control_group=self.control_group,
            engine_urls=self.services.worker_urls if self.services else None,
            transport="tensor" if colocated else s.transport,
            bucket_bytes=int(s.bucket_mb * 2**20), disk_dir=s.disk_dir or (self.run_dir / "weight_sync"),
            master_address=master_address, flattened_bucket=s.flattened_bucket, timeout_s=s.timeout_s,
            verify=s.verify, tolerance=s.verify_tolerance or default_verify_tolerance(self.dtype), probe=probe[0],
            api_key=cfg.rollout.api_key, log_path=self.run_dir / "sync_probe.jsonl", device=self.device,
            node_engine_urls=list(cfg.rollout.student_urls) if colocated else None,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if colocated:
            self.colocation = Colocation(ddp_model=learner.ddp_model, optimizer=learner.optimizer,
                                         weight_sync=self.weight_sync, control_group=self.control_group,
                                         is_controller=self.is_controller, device=self.device)
        if not cfg.embedded_student:
            self.weight_sync.sync(self.state.step)

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        self.stop.install()
        try:
            self.setup()
            if self.cfg.eval.every and self.cfg.eval.at_start and self.state.step == 0:
                self.metrics.log(0, self._evaluate(0), count_step=False)
            while self.state.step < self.cfg.steps and not self.stop.agreed(self.control_group):
                if not self._train_one_step(self.state.step + 1):  # rollouts abandoned: nothing trained
                    break
            if self.state.step > self.last_saved_step and (self.cfg.checkpoint.save_at_end or self.stop.requested):
                self._save()
            if self.stop.requested:
                abandoned = self.stop.abandoned_step
                logger.warning("stopped by %s after step %d%s; checkpoint of step %d saved", self.stop.reason,
                               self.state.step, f" (rollouts of step {abandoned} abandoned)"
                               if abandoned is not None else "", self.state.step)
                self.stop.honoured()
            return 0
        finally:
            self.shutdown()

    # ------------------------------------------------------------------ one step
    def _train_one_step(self, step: int) -> bool:
        """Step ``step`` on every rank; False when a stop abandoned its rollouts (nothing trained)."""
        from ..objective import plan_batch

        timer = StepTimer()
        batch = self.rollouts.collect(step, self.engine_version)
        if batch is None:
            return False
        metrics = batch_metrics(batch, engine_version=self.engine_version, policy_version=step - 1,
                                per_teacher=bool(self.cfg.teacher.routes))
        data = self._step_data(step, batch)
        if data is None:  # every group filtered out
            self.state.count_empty(step, len(batch.trajectories), self.cfg.faults.max_empty_steps)
            return self._finish_step(step, metrics, timer)
        self.state.empty_steps_in_a_row = 0
        metrics.update(self.recorder.data_metrics(step, data))
        if self.colocation is not None:  # the engines hand the devices over
            with timer("colocation"):
                metrics.update(self.colocation.to_training())
        with timer("old_logprobs"):
            try:
                old = self.learner.old_logprobs(data)  # None for sft / kd
            except ValueError as exc:  # every rank has the same batch: every rank stops here
                raise TrainingAborted(f"step {step}: {exc}") from exc
        reference = None
        if self.learner.reference_model is not None:  # GRPO's KL to the initial policy
            with timer("ref_logprobs"):
                reference = self.learner.reference_logprobs(data)
        update = None
        with timer("train"):
            if old is not None and not _finite_means(data, old):
                self.state.count_nonfinite(step, "non-finite student or teacher log-probs",
                                           self.cfg.faults.max_nonfinite_steps)
            else:
                plan = plan_batch(self.learner.objective, **_plan_inputs(data, old))
                update = self.learner.update(data, plan, old, reference)
                metrics.update(self.recorder.plan_metrics(plan) | self.recorder.update_metrics(update))
                if update.failure is not None:
                    self.state.count_nonfinite(step, update.failure, self.cfg.faults.max_nonfinite_steps)
        if self.colocation is not None:  # and take them back; their weights come with the sync
            with timer("colocation"):
                metrics.update(self.colocation.to_generation())
        with timer("rollout_wait"):  # asynchronous rollouts: the engines finish the next batch first
            self.rollouts.finish_prefetch()
        updated = update is not None and update.updated
        with timer("sync"):
            sync = self._push_weights(step) if updated and self.weight_sync is not None else None
        if self.cfg.data.replay:  # no engines: the replayed rollouts' versions are the original run's
            self.engine_version = step
        metrics.update(self.recorder.sync_metrics(sync))
        metrics.update(self.recorder.perf_metrics(data, updated, timer))
        if self.cfg.rollout.max_staleness > 0 and self.is_controller:
            metrics.update(self.rollouts.overlap_metrics(timer.spans["old_logprobs"][0], timer.spans["train"][1],
                                                         timer.start, time.monotonic()))
        return self._finish_step(step, metrics, timer)

    def _step_data(self, step: int, batch: RolloutBatch) -> StepData | None:
        """This rank's micro-batches of the batch (None: nothing left after filtering)."""
        p = self.cfg.parallel
        try:  # every rank sees the same batch, so every rank fails the same way
            return build_step_data(batch.trajectories, dp=self.layout.dp, dp_rank=self.layout.dp_rank,
                                   micro_batch_size=p.micro_batch_size, pad_id=0,
                                   filter_uniform_groups=self.cfg.algorithm.filter_uniform_groups,
                                   max_tokens_per_microbatch=p.max_tokens_per_microbatch, cp_size=self.layout.cp,
                                   cp_rank=self.layout.cp_rank, oversize=p.oversize_sequences,
                                   teacher_topk=self.learner.teacher_topk,
                                   length_multiple=self.learner.length_multiple,
                                   max_tokens_per_forward=p.forward_token_budget)
        except ValueError as exc:
            raise TrainingAborted(f"step {step}: {exc}") from exc

    def _push_weights(self, step: int) -> Any:
        """The new weights to the student engines, checked on the probe; SyncResult."""
        try:
            sync = self.weight_sync.sync(step)
        except SyncError as exc:
            raise TrainingAborted(str(exc)) from exc
        self.engine_version = step
        return sync

    def _finish_step(self, step: int, metrics: dict[str, float], timer: StepTimer) -> bool:
        """Counters, eval, checkpoint, HF export and the step's metrics; the step is complete."""
        self.rollouts.finish_prefetch()  # a checkpoint holds the batch generated ahead, never a half one
        self.state.step = step
        metrics.update(timer.seconds)
        metrics["train/skipped_nonfinite_total"] = self.state.nonfinite_steps
        metrics["train/skipped_empty_total"] = self.state.empty_steps_total
        metrics["time/step"] = timer.elapsed()
        if self._eval_due(step):
            metrics.update(self._evaluate(step))
        k = self.cfg.checkpoint
        with timer("checkpoint"):
            if k.every and step % k.every == 0:
                self._save(metrics)
            if step in k.export_hf_steps or (k.export_hf_every and step % k.export_hf_every == 0):
                self.learner.export_hf(self.run_dir / "hf" / f"step_{step:08d}")
        metrics["time/checkpoint"] = timer.seconds["time/checkpoint"]
        if self.state.sampler is not None:  # rank 0, unless replaying
            metrics["data/epoch"] = self.state.sampler.epoch
        self.metrics.log(step, metrics)
        return True

    # ------------------------------------------------------------------ around the step
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
            controller = self.services.controller
            reward_fn = controller.reward_function
            scalars = evaluate(controller.student, e.benchmarks, self.tokenizer, settings=settings,
                               reward_pool=None if reward_fn else self.services.reward_pool, reward_fn=reward_fn,
                               loop=self.services.loop, limit=e.limit,
                               out_dir=self.run_dir / "eval" / f"step_{step:08d}")
            logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in sorted(scalars.items())
                                                              if "avg@" in k or "pass@" in k))
        dist.barrier(group=self.control_group)
        return scalars

    def _save(self, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint of the current step (a collective); ``metrics`` may hold ``checkpoint.keep_best``."""
        step = self.state.step
        learner = self.learner
        self.checkpoints.save(step, **learner.checkpoint_parts(), arch=learner.arch, hf_side_dir=learner.hf_side_dir,
                              dtype=self.dtype, trainer_state=self.state.state_dict(), config_yaml=self.config_yaml,
                              metrics=metrics)
        self.last_saved_step = step
        logger.info("checkpoint of step %d %s %s", step, "being written to" if self.cfg.checkpoint.async_save
                    else "written to", self.cfg.checkpoint_dir)

    def _release_engines(self) -> None:
        """Close the weight sync and the controller's clients, stop the embedded engines (idempotent)."""
        if self.weight_sync is not None:
            self.weight_sync.close()
            self.weight_sync = None
        if self.services is not None:
            self.services.close_controller()
        if self.engines is not None:
            self.engines.stop()

    def shutdown(self) -> None:
        """Stop the engines and helpers of this rank (idempotent; also after errors); an
        asynchronous checkpoint write still in flight is completed first."""
        if self.checkpoints is not None:
            checkpoints, self.checkpoints = self.checkpoints, None
            checkpoints.close()
        self._release_engines()
        if self.services is not None:
            self.services.close()
            self.services = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
