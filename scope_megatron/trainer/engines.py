"""The engines the trainer talks to (rank 0): embedded engine processes it starts, and the
rollout controller, reward pool and event loop that drive them.

Embedded engines start in background threads, so the teacher loads while the trainer builds the
student; each is described by the same :class:`~scope_megatron.rollout.engine.EngineConfig` that
``scope-megatron serve`` builds from its flags, and runs as a separate process (its own CUDA
context, no member of the trainer's process group).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_TEACHER, Config
from ..rollout.engine import EngineConfig

logger = logging.getLogger(__name__)

ENGINE_READY_TIMEOUT_S = 300.0


def engine_server_args(config: EngineConfig, log_level: str = "warning") -> list[str]:
    """``scope-megatron serve`` flags (after ``--model``/``--port``) that reproduce ``config``."""
    args = ["--dtype", config.dtype, "--max-batch-size", str(config.max_batch_size),
            "--random-seed", str(config.random_seed), "--weight-version", config.weight_version,
            "--log-level", log_level]
    if config.device:
        args += ["--device", config.device]
    if config.context_length is not None:
        args += ["--context-length", str(config.context_length)]
    if config.served_model_name:
        args += ["--served-model-name", config.served_model_name]
    if config.skip_tokenizer_init:
        args.append("--skip-tokenizer-init")
    if config.enable_deterministic_inference:
        args.append("--enable-deterministic-inference")
    if config.enable_memory_saver:
        args.append("--enable-memory-saver")
    if config.enable_weights_cpu_backup:
        args.append("--enable-weights-cpu-backup")
    return args


def teacher_role(name: str) -> str:
    """The engine role of teacher ``name``: ``teacher`` for the default one, ``teacher-NAME`` else."""
    return "teacher" if name == DEFAULT_TEACHER else f"teacher-{name}"


def embedded_engine_config(cfg: Config, role: str, model_dir: str | Path, dtype: str,
                           weight_version: str) -> EngineConfig:
    """The embedded ``role`` ("student", or a teacher's :func:`teacher_role`) engine of a run: its
    device and batch size from the config, the trainer's dtype, and ``sampling_seed`` honoured when
    rollouts are seeded (SGLang honours it only with ``--enable-deterministic-inference``). A
    colocated student runs with the memory saver (its memory is released while the trainer trains)."""
    if role == "student":
        section = cfg.rollout
    else:
        section = cfg.teacher.servers()[DEFAULT_TEACHER if role == "teacher" else role.removeprefix("teacher-")]
    colocated = role == "student" and cfg.placement == "colocated"
    return EngineConfig(model_path=str(model_dir), device=section.embedded_device or None, dtype=dtype,
                        max_batch_size=section.embedded_max_batch_size, random_seed=cfg.seed,
                        weight_version=weight_version, enable_deterministic_inference=cfg.rollout.seeded,
                        enable_memory_saver=colocated)


@dataclass
class EmbeddedEngines:
    """Embedded engine processes, started in the background and stopped together."""

    engines_dir: Path
    handles: dict[str, Any] = field(default_factory=dict)     # role -> EmbeddedServerHandle
    _starting: dict[str, Future] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def launch(self, role: str, config: EngineConfig) -> None:
        """Start the ``role`` engine in a background thread; :meth:`wait` returns its handle."""
        from ..rollout.embedded_server import start_embedded_server_process

        self.engines_dir.mkdir(parents=True, exist_ok=True)

        def start() -> Any:
            handle = start_embedded_server_process(config.model_path, extra_args=engine_server_args(config),
                                                   log_path=self.engines_dir / f"{role}.log",
                                                   ready_timeout=ENGINE_READY_TIMEOUT_S)
            (self.engines_dir / f"{role}.pid").write_text(str(handle.process.pid))
            logger.info("embedded %s engine (pid %d) at %s", role, handle.process.pid, handle.url)
            return handle

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-start")
        self._starting[role] = self._pool.submit(start)

    def wait(self) -> dict[str, Any]:
        """Wait for every launched engine; each one that started is registered for :meth:`stop`."""
        first_error = None
        for role, future in list(self._starting.items()):
            try:
                self.handles[role] = future.result()
            except Exception as exc:
                first_error = first_error or RuntimeError(f"the embedded {role} engine did not start: {exc}")
            del self._starting[role]
        if first_error is not None:
            raise first_error
        return dict(self.handles)

    def url(self, role: str) -> str:
        return self.handles[role].url

    def stop(self) -> None:
        """Stop every engine (idempotent); engines still starting are waited for first."""
        if self._starting:
            try:
                self.wait()
            except Exception:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        handles = list(self.handles.values())
        for handle in handles:  # signal all first, so they exit concurrently
            if handle.process is not None:
                handle.process.terminate()
        for handle in handles:
            try:
                handle.stop()
            except Exception as exc:
                logger.warning("stopping an engine failed: %s", exc)
        self.handles.clear()


@dataclass
class RolloutServices:
    """Rank 0's side of generation: the controller (student + teacher clients), the reward
    pool and the event loop they run on, and the URLs of the student workers that receive
    weights (``None`` on other ranks)."""

    controller: Any            # trainer.controller.RolloutController
    loop: Any                  # rollout.client.BackgroundLoop
    reward_pool: Any | None    # rollout.rewards.MathRewardPool; None with algorithm.reward_function
    worker_urls: list[str]
    teacher_url: str

    @classmethod
    def connect(cls, cfg: Config, engines: EmbeddedEngines, *, tokenizer: Any, vocab_size: int,
                teacher_topk: int) -> "RolloutServices":
        """Connect to the engines (embedded ones from ``engines``, else the configured URLs), wait
        until they answer, and check what must hold before any rollout: seeds honoured
        (``rollout.seeded``), and the teacher reads the student's token ids."""
        from ..rollout.client import BackgroundLoop
        from ..rollout.protocol import SamplingParams
        from ..rollout.rewards import MathRewardPool
        from ..rollout.vocab import check_teacher_vocabulary
        from .controller import RolloutController, load_function

        r, t, a = cfg.rollout, cfg.teacher, cfg.algorithm
        handles = engines.wait()
        if cfg.embedded_student:
            worker_urls = [handles["student"].url]
            student_url = worker_urls[0]
        else:
            worker_urls = list(r.student_urls)
            student_url = r.student_router_url or worker_urls[0]
        teacher_urls = {name: (server.router_url or server.urls[0]) if server.urls else handles[teacher_role(name)].url
                        for name, server in t.servers().items()}
        teacher_url = teacher_urls[DEFAULT_TEACHER]
        loop = BackgroundLoop("scope-controller")
        reward_pool = None
        if not a.reward_function:
            reward_pool = MathRewardPool(num_workers=a.reward_workers, timeout_s=a.reward_timeout_s)
            reward_pool.start()
        sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                  top_k=r.top_k)
        controller = RolloutController(
            student_url=student_url, teacher_url=teacher_url, group_size=r.group_size, sampling=sampling,
            seed=cfg.seed, seeded=r.seeded, tokenizer=tokenizer, reward_pool=reward_pool, loop=loop,
            api_key=r.api_key, max_concurrency=r.max_concurrency, teacher_max_concurrency=t.max_concurrency,
            request_timeout_s=r.request_timeout_s, max_retries=r.max_retries, retry_backoff_s=r.retry_backoff_s,
            reward_function=load_function(a.reward_function) if a.reward_function else None,
            teacher_topk=teacher_topk, student_vocab_size=vocab_size, routes=t.routes,
            other_teachers={name: (teacher_urls[name], server.max_concurrency) for name, server in t.others.items()},
            student_workers=() if r.student_router_url else worker_urls)
        services = cls(controller=controller, loop=loop, reward_pool=reward_pool, worker_urls=worker_urls,
                       teacher_url=teacher_url)
        try:
            # external student workers may have outlived a killed trainer mid-update: recovered first
            controller.wait_ready(timeout_s=600, recover_urls=() if cfg.embedded_student else worker_urls)
            controller.check_student_servers(worker_urls, require_deterministic=r.require_deterministic)
            for name, server in t.servers().items():  # each teacher must read the student's token ids
                check_teacher_vocabulary(tokenizer, student_name=str(cfg.model.student), tokenizer_dir=server.tokenizer,
                                         model_dir=server.model or None,
                                         model_info=lambda name=name: controller.teacher_model_info(name),
                                         teacher_url=teacher_urls[name], field_prefix=t.field_prefix(name))
        except BaseException:
            services.close()
            raise
        return services

    def close_controller(self) -> None:
        """Close the HTTP clients (in-flight requests end); the loop and pool stay for :meth:`close`."""
        if self.controller is not None:
            self.controller.close()
            self.controller = None

    def close(self) -> None:
        """Close everything (idempotent)."""
        self.close_controller()
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
