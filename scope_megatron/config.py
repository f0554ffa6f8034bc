"""The one typed configuration of a SCOPE training run.

A run is configured by a YAML file plus ``key=value`` overrides on the command line::

    torchrun ... -m scope_megatron.train --config configs/tiny_cpu.yaml steps=10 rollout.group_size=4

Every section is a dataclass below; unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the field (``rollout.group_size: must be >= 1, got 0``). Override
values are parsed as YAML scalars / flow lists (``a.b=[1,2]``, ``x=null``, ``y=true``). The
resolved config is printed on rank 0 and written to ``RUN_DIR/config.yaml``.

``docs/training.md`` is the field reference.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or out of range; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field {field_name!r}: {message}")
        self.field = field_name


SUPERVISED_PRESETS = ("sft", "kd")


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    student: str = ""                    # converted checkpoint dir (scope_megatron.json) or HF dir
    dtype: str = "auto"                  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    layer_impl: str = "auto"             # auto | te | local | local_sdpa
    # activation recomputation: none | selective (core attention) | full (whole layers, see below)
    recompute: str = "none"
    recompute_method: str = "uniform"    # full: uniform (groups of recompute_num_layers) | block (first N per stage)
    recompute_num_layers: int = 1        # full: layers per group (uniform) / recomputed layers per stage (block)
    # fusions: auto = on where the kernel exists (GPU with TE / apex, see docs/training.md), off on CPU;
    # true without the kernel is refused at model build
    apply_rope_fusion: Union[bool, str] = "auto"             # TE's fused RoPE (also for packed THD rows)
    bias_activation_fusion: Union[bool, str] = "auto"        # fused SwiGLU (megatron's torch.compile kernel)
    bias_dropout_fusion: Union[bool, str] = "auto"           # fused bias-dropout-add
    gradient_accumulation_fusion: Union[bool, str] = "auto"  # wgrad GEMM accumulates into main_grad (apex)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1                          # context parallel: each packed sequence split over cp ranks
    micro_batch_size: int = 4            # trajectories per padded micro-batch (per DP rank)
    max_tokens_per_microbatch: Optional[int] = None  # set: packed (THD) micro-batches of at most this many tokens
    # packed only: token budget of the forward-only lp_old pass (no activations kept for a
    # backward, so it can be larger); null = 2 x max_tokens_per_microbatch (forward_token_budget)
    max_tokens_per_forward: Optional[int] = None
    oversize_sequences: str = "alone"    # a sequence over the token budget: alone (own micro-batch) | error
    use_distributed_optimizer: bool = True
    # split LayerNorm / residual / dropout activations over the TP ranks (auto: on when tp > 1);
    # micro-batches are padded to a multiple of tp (x 2*cp with context parallelism)
    sequence_parallel: Union[bool, str] = "auto"
    # how long a rank may wait in a collective (torch.distributed and megatron's groups); rank 0's
    # HTTP phases (weight-group formation, pause) sit between collectives. NCCL's default is 10
    distributed_timeout_minutes: int = 60

    @property
    def forward_token_budget(self) -> Optional[int]:
        """The lp_old pass's token budget: max_tokens_per_forward, else 2 x the training budget (packed only)."""
        if self.max_tokens_per_microbatch is None:
            return None
        return self.max_tokens_per_forward or 2 * self.max_tokens_per_microbatch


@dataclass
class DataConfig:
    paths: list = field(default_factory=list)   # .jsonl / .parquet prompt files
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: Optional[str] = "id"
    solution_key: str = "solution"       # sft / kd: the target response of each record
    prompt_format: str = "paper"         # paper | reference_code
    max_prompt_tokens: Optional[int] = 4096
    limit: Optional[int] = None
    shuffle: bool = True
    source_key: str = "data_source"      # a record's data source (teacher.routes); absent: the file's name stem
    # a run directory (or its rollouts/) saved with logging.save_rollouts: train on its batches, no engines
    replay: Optional[str] = None


@dataclass
class RolloutConfig:
    prompts_per_step: int = 256          # B
    group_size: int = 8                  # G
    max_new_tokens: int = 12288
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1
    seeded: bool = True                  # sampling_seed from (seed, step, prompt, sample): reproducible
    # with seeded: refuse student servers without --enable-deterministic-inference (false: warn only)
    require_deterministic: bool = True
    student_urls: list = field(default_factory=list)  # worker URLs; empty: embedded engine
    # generation goes through the router when set; else prompt group i to worker i mod N
    student_router_url: Optional[str] = None
    api_key: Optional[str] = None
    max_concurrency: int = 256
    request_timeout_s: float = 3600.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    embedded_device: Optional[str] = None        # None: cpu without CUDA; on GPU it must be set (check_embedded_devices)
    embedded_max_batch_size: int = 32
    # 0: generate, then train (exactly on-policy). N >= 1: the next batch is generated while
    # this one trains (one batch ahead, so 1 version behind); batches more than N versions
    # behind the trainer are regenerated
    max_staleness: int = 0


@dataclass
class TeacherServerConfig:
    """One teacher: its servers, or the HF directory of an embedded engine."""

    model: str = ""                      # HF dir, for the embedded teacher
    tokenizer: Optional[str] = None      # teacher tokenizer dir for the vocabulary check (default: model)
    urls: list = field(default_factory=list)     # teacher workers; empty: embedded engine
    router_url: Optional[str] = None
    max_concurrency: int = 256
    embedded_device: Optional[str] = None
    embedded_max_batch_size: int = 32


DEFAULT_TEACHER = "default"  # the name of the teacher the fields of the teacher section describe


@dataclass
class TeacherConfig(TeacherServerConfig):
    """The default teacher, and optionally more: a prompt whose data source (``data.source_key``)
    is a key of ``routes`` is scored by the teacher the route names ("default" or a key of
    ``others``); every other prompt by the default teacher."""

    routes: dict[str, str] = field(default_factory=dict)                     # data source -> teacher name
    others: dict[str, TeacherServerConfig] = field(default_factory=dict)    # name -> another teacher

    def servers(self) -> dict[str, TeacherServerConfig]:
        """Every teacher by name, the default first."""
        return {DEFAULT_TEACHER: self, **self.others}

    def field_prefix(self, name: str) -> str:
        """Where teacher ``name``'s fields are in the config (for error messages)."""
        return "teacher" if name == DEFAULT_TEACHER else f"teacher.others.{name}"


@dataclass
class AlgorithmConfig:
    preset: str = "scope"                # a preset of objective.ObjectiveConfig (scope, opd, grpo, ...)
    tau: Optional[float] = None          # None = the preset's value (scope: 1.0)
    normalize: Optional[str] = None      # mean1 | sum1
    student_sign: Optional[str] = None   # paper | reversed
    teacher_sign: Optional[str] = None
    student_uniform: Optional[bool] = None
    teacher_uniform: Optional[bool] = None
    mle_coef: Optional[float] = None
    kl_coef: Optional[float] = None
    aggregation: Optional[str] = None    # ref_token_mean | path_token_mean | token_mean | paper_token_sum
    clip_eps: Optional[float] = None
    mle_form: Optional[str] = None       # ratio | nll
    sampled_kl_coef: Optional[float] = None
    grpo_kl_beta: Optional[float] = None
    # truncated importance sampling against the engine's log-probs (none | tis), its cap C
    off_policy_correction: Optional[str] = None
    tis_cap: Optional[float] = None
    # top-k KL to the teacher on the KL path (beyond the paper): forward | reverse (None: off)
    topk_kl: Optional[str] = None
    topk_tail: Optional[bool] = None     # add a "rest of the vocabulary" bucket to the top-k distributions
    topk_kl_coef: Optional[float] = None
    topk_k: int = 32                     # teacher's top-k ids per response token (with topk_kl)
    # student log-probs (old and current) from logits / rollout temperature (the reference code)
    scale_logits_by_rollout_temperature: bool = True
    updates_per_batch: int = 1           # optimizer steps per rollout batch (>1: set clip_eps)
    # recompute: a forward-only pass gives lp_old and the student means of the SCOPE weights;
    # rollout: no pass, the means come from the engine's sampled-token log-probs (docs: Cheaper passes)
    old_logprobs: str = "recompute"
    filter_uniform_groups: bool = False  # drop all-correct / all-wrong groups (DAPO-style; off in SCOPE)
    # with filter_uniform_groups: draw more prompts until prompts_per_step informative groups are in
    refill_filtered_groups: bool = False
    refill_max_rounds: int = 4           # extra generation rounds per step at most (each <= prompts_per_step prompts)
    reward_workers: int = 2
    reward_timeout_s: float = 10.0
    # "package.module:function" (text, gold, truncated) -> reward in [0, 1], instead of math-verify
    reward_function: Optional[str] = None

    def objective_overrides(self) -> dict[str, Any]:
        """The fields this section shares with ``objective.ObjectiveConfig`` that are set (not None)."""
        from .objective import ObjectiveConfig

        shared = {f.name for f in dataclasses.fields(ObjectiveConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in shared and getattr(self, f.name) is not None}


@dataclass
class OptimizerConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"     # constant | linear | cosine
    min_lr: float = 0.0


@dataclass
class SyncConfig:
    # distributed (NCCL on GPU, gloo on CPU) | disk | tensor (in memory; placement=colocated,
    # which uses it whatever is set here)
    transport: str = "distributed"
    bucket_mb: float = 512.0
    disk_dir: Optional[str] = None       # disk transport: a path the engines can read (default RUN_DIR/weight_sync)
    flattened_bucket: bool = False
    master_address: str = "auto"         # rank 0's address as the engines see it; auto: resolved by rank 0
    verify: bool = True                  # score a probe on the engine after each sync and compare
    # largest allowed mean |lp_engine - lp_trainer| over the probe (the engine's greedy
    # continuation of the first prompt); None: 1e-3 fp32, 0.1 bf16 (weight_sync.default_verify_tolerance)
    verify_tolerance: Optional[float] = None
    probe_tokens: int = 16               # length of the probe's greedy continuation
    timeout_s: float = 1800.0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None            # default RUN_DIR/checkpoints
    every: int = 50                      # save every K steps (0: only at the end / on SIGTERM)
    keep_last: int = 3                   # keep the last M (0: keep all)
    resume: Optional[str] = None         # None | latest | a checkpoint directory
    save_at_end: bool = True
    export_hf_steps: list = field(default_factory=list)  # steps to export as HF (RUN_DIR/hf/step_N)
    export_hf_every: int = 0
    keep_best: str = ""                  # a metric name (e.g. eval/mean/avg@1): its best checkpoint survives pruning
    keep_best_mode: str = "max"          # max | min: which value of keep_best is best
    # spread checkpoint writes / reads over the data-parallel ranks; off by default: megatron-core
    # 0.19's fully-parallel save can hand the "common_state" object to a rank whose copy is None,
    # and the checkpoint then fails to load (seen once in four CPU runs; docs/training.md)
    fully_parallel: bool = False
    async_save: bool = False             # write model + optimizer shards in a forked process while training goes on


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "scope-megatron"
    entity: Optional[str] = None
    name: Optional[str] = None           # run name (None: W&B's generated name)
    tags: list = field(default_factory=list)
    mode: str = "online"                 # online | offline | disabled; online without an API key runs offline


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    tqdm: bool = True
    peak_tflops: Optional[float] = None  # per device, for MFU; None: from the GPU name (CPU: 0.1 nominal)
    level: str = "INFO"
    save_rollouts: bool = False          # every step's trajectories to RUN_DIR/rollouts/step_N.jsonl
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases run (pip install .[wandb])


@dataclass
class EvalConfig:
    every: int = 0                       # evaluate the student every N steps (0: never); RL modes only
    at_start: bool = True                # also before the first step (step 0)
    benchmarks: list = field(default_factory=list)  # jsonl files with problem / answer (evaluation module)
    limit: Optional[int] = None          # first N problems of each benchmark
    n: int = 4                           # samples per problem
    ks: list = field(default_factory=list)          # k values (default 1 and n)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768


@dataclass
class FaultConfig:
    max_nonfinite_steps: int = 3         # abort after this many skipped NaN/inf steps (total)
    max_empty_steps: int = 10            # abort after this many consecutive all-filtered steps


@dataclass
class Config:
    run_dir: str = "runs/scope"
    steps: int = 100
    seed: int = 1234
    # separate: the student engines have GPUs of their own. colocated: they share the trainer's
    # (memory handed back and forth every step, weights pushed in memory; docs/training.md)
    placement: str = "separate"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    # -------------------------------------------------------------- derived paths
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    @property
    def supervised(self) -> bool:
        """sft / kd: plain MLE on given (prompt, solution) records; no engines, no rollouts, no sync."""
        return self.algorithm.preset in SUPERVISED_PRESETS

    @property
    def uses_engines(self) -> bool:
        """Student and teacher engines run: not for sft / kd, nor when replaying saved rollouts."""
        return not self.supervised and not self.data.replay

    @property
    def embedded_student(self) -> bool:
        return not self.rollout.student_urls

    @property
    def embedded_teacher(self) -> bool:
        return not self.teacher.urls

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def objective_config(self):
        """The objective module's ObjectiveConfig (preset + overrides), validated."""
        from .objective import ObjectiveConfig

        try:
            return ObjectiveConfig.preset(self.algorithm.preset, **self.algorithm.objective_overrides())
        except (ValueError, TypeError) as exc:
            raise ConfigError("algorithm", str(exc)) from exc


# ------------------------------------------------------------------------------------------ building
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` against annotation ``tp`` (str annotations already resolved)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                pass
        raise ConfigError(name, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(name, f"expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool) or not str(key):
                raise ConfigError(name, f"keys must be names, got {key!r}")
            out[str(key)] = _coerce(f"{name}.{key}", item, value_type)
        return out
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str) and value:
            return [value]
        raise ConfigError(name, f"expected a list, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    raise ConfigError(name, f"unsupported annotation {tp!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(full, f"unknown field{hint}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(full, data[f.name], hints[f.name])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from exc
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(path[:i + 1]), "is not a section; cannot set a field inside it")
        node = nxt
    node[path[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a mapping in ``top`` updates the one in ``base``)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; a top-level ``base: other.yaml`` (relative to the file) is read
    first and this file's keys override it, so a variant states only what differs."""
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    if p.resolve() in seen:
        raise ConfigError(str(p), "base: configs include each other in a cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(p), "the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base", f"must be a path to another config file, got {base!r}")
    return _merge(_read_yaml(p.parent / base, (*seen, p.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``overrides``, build and validate the :class:`Config`."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    config = _build(Config, data)
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain dict (e.g. a saved config.yaml)."""
    config = _build(Config, data)
    validate(config)
    return config


# ------------------------------------------------------------------------------------------ validation
def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


def _choice(value: Any, name: str, choices: tuple) -> None:
    _require(value in choices, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def validate(c: Config) -> None:
    """Range and consistency checks; each error names its field."""
    _require(c.steps >= 1, "steps", f"must be >= 1, got {c.steps}")
    _require(bool(c.run_dir), "run_dir", "must be set")
    _require(bool(c.model.student), "model.student", "must name a converted checkpoint or an HF directory")
    _choice(c.model.dtype, "model.dtype", ("auto", "float32", "bfloat16"))
    _choice(c.model.layer_impl, "model.layer_impl", ("auto", "te", "local", "local_sdpa"))
    _choice(c.model.recompute, "model.recompute", ("none", "selective", "full"))
    _choice(c.model.recompute_method, "model.recompute_method", ("uniform", "block"))
    _require(c.model.recompute_num_layers >= 1, "model.recompute_num_layers",
             f"must be >= 1, got {c.model.recompute_num_layers}")
    for name in ("apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "gradient_accumulation_fusion"):
        _choice(getattr(c.model, name), f"model.{name}", (True, False, "auto"))
    _choice(c.parallel.sequence_parallel, "parallel.sequence_parallel", (True, False, "auto"))
    if c.parallel.sequence_parallel is True:
        _require(c.parallel.tp > 1, "parallel.sequence_parallel", "needs tensor parallelism (parallel.tp > 1); "
                                                                  "use auto or false")
    for name in ("tp", "pp", "cp", "micro_batch_size"):
        value = getattr(c.parallel, name)
        _require(value >= 1, f"parallel.{name}", f"must be >= 1, got {value}")
    budget = c.parallel.max_tokens_per_microbatch
    if budget is not None:
        _require(budget >= 1, "parallel.max_tokens_per_microbatch", f"must be >= 1 or null, got {budget}")
    forward_budget = c.parallel.max_tokens_per_forward
    if forward_budget is not None:
        _require(budget is not None, "parallel.max_tokens_per_forward",
                 "needs packed micro-batches: set parallel.max_tokens_per_microbatch")
        _require(forward_budget >= budget, "parallel.max_tokens_per_forward",
                 f"must be >= parallel.max_tokens_per_microbatch ({budget}), got {forward_budget}")
    _choice(c.parallel.oversize_sequences, "parallel.oversize_sequences", ("alone", "error"))
    if c.parallel.cp > 1:
        _require(budget is not None, "parallel.max_tokens_per_microbatch",
                 f"context parallelism (parallel.cp = {c.parallel.cp}) splits packed sequences: set a token budget "
                 f"(e.g. 16384) to train on packed micro-batches")
        _require(c.model.layer_impl != "local", "model.layer_impl",
                 "megatron's local attention has no context parallelism: use auto, te or local_sdpa")
    if c.data.replay:
        _check_replay(c)
    else:
        _require(bool(c.data.paths), "data.paths", "must list at least one prompt file")
    _choice(c.data.prompt_format, "data.prompt_format", ("paper", "reference_code"))
    if c.data.max_prompt_tokens is not None:
        _require(c.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1 or null")
    r = c.rollout
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {r.prompts_per_step}")
    _require(r.group_size >= 1, "rollout.group_size", f"must be >= 1, got {r.group_size}")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _require(math.isfinite(r.temperature) and r.temperature > 0, "rollout.temperature",
             f"must be > 0 (the student log-probs divide by it), got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", f"must be -1 (all) or >= 1, got {r.top_k}")
    _require(r.max_concurrency >= 1, "rollout.max_concurrency", "must be >= 1")
    _require(r.max_retries >= 0, "rollout.max_retries", "must be >= 0")
    _require(r.request_timeout_s > 0, "rollout.request_timeout_s", "must be > 0")
    _require(r.embedded_max_batch_size >= 1, "rollout.embedded_max_batch_size", "must be >= 1")
    _check_teachers(c)
    a = c.algorithm
    _require(a.updates_per_batch >= 1, "algorithm.updates_per_batch", "must be >= 1")
    _require(a.reward_workers >= 1, "algorithm.reward_workers", "must be >= 1")
    _require(a.reward_timeout_s > 0, "algorithm.reward_timeout_s", "must be > 0")
    if a.refill_filtered_groups:
        _require(a.filter_uniform_groups, "algorithm.refill_filtered_groups",
                 "refills the groups algorithm.filter_uniform_groups drops: set that too")
        _require(not c.supervised, "algorithm.refill_filtered_groups",
                 f"algorithm.preset={a.preset!r} trains on given text: there is nothing to refill")
    _require(a.refill_max_rounds >= 1, "algorithm.refill_max_rounds", f"must be >= 1, got {a.refill_max_rounds}")
    if a.reward_function is not None:
        _require(":" in a.reward_function, "algorithm.reward_function", "must look like package.module:function")
    objective = c.objective_config()
    if objective.grpo_kl_beta > 0:  # the KL to the initial policy is a term of GRPO's loss only
        _require(objective.method == "grpo", "algorithm.grpo_kl_beta",
                 f"is a term of the grpo preset's loss, not of {a.preset!r} (use 0)")
    _require(c.rollout.max_staleness >= 0, "rollout.max_staleness", f"must be >= 0, got {c.rollout.max_staleness}")
    if c.rollout.max_staleness > 0:
        _require(not c.supervised, "rollout.max_staleness",
                 f"algorithm.preset={a.preset!r} trains on given text: there is no generation to overlap (use 0)")
    _choice(c.placement, "placement", ("separate", "colocated"))
    if c.placement == "colocated":
        _require(not c.supervised, "placement", f"algorithm.preset={a.preset!r} runs no student engine to colocate")
        _require(c.rollout.max_staleness == 0, "placement",
                 "colocated engines and the trainer take turns on the same devices, so generation cannot "
                 "overlap training: use rollout.max_staleness=0, or placement=separate for asynchronous rollouts")
        _require(c.sync.transport != "disk", "sync.transport",
                 "colocated engines get their weights in memory (update_weights_from_tensor); the disk transport "
                 "does not apply")
    else:
        _require(c.sync.transport != "tensor", "sync.transport",
                 "tensor handles (CUDA IPC, shared memory) reach only engines on the trainer's own devices: "
                 "set placement=colocated, or use distributed / disk")
    _choice(a.old_logprobs, "algorithm.old_logprobs", ("recompute", "rollout"))
    if a.old_logprobs == "rollout":
        why = "lp_old then is the current policy's log-probs detached, exact only for one on-policy update"
        for field_name, refused, reason in (
                ("algorithm.preset", c.supervised, "sft / kd have no rollouts"),
                ("algorithm.updates_per_batch", a.updates_per_batch > 1, why),
                ("rollout.max_staleness", c.rollout.max_staleness > 0, why),
                ("algorithm.off_policy_correction", objective.off_policy_correction != "none",
                 "the correction compares the recomputed lp_old with the engine's log-probs"),
                ("algorithm.scale_logits_by_rollout_temperature", not a.scale_logits_by_rollout_temperature,
                 "the engine's sampled-token log-probs are at rollout.temperature and the trainer's would be at 1")):
            _require(not refused, field_name, f"not with algorithm.old_logprobs=rollout: {reason}")
    if a.updates_per_batch > 1 and objective.clip_eps is None:
        raise ConfigError("algorithm.clip_eps", "several updates per batch need a PPO clip (e.g. 0.2)")
    if objective.topk_kl != "none":
        _require(objective.method in ("scope", "opd"), "algorithm.topk_kl",
                 f"top-k KL is a term of the KL path (scope / opd presets), not of {a.preset!r}")
        _require(a.topk_k >= 1, "algorithm.topk_k", f"must be >= 1, got {a.topk_k}")
    o = c.optimizer
    _require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(o.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0: no clipping)")
    _require(o.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", "must be >= 0")
    _choice(o.lr_decay_style, "optimizer.lr_decay_style", ("constant", "linear", "cosine"))
    s = c.sync
    _choice(s.transport, "sync.transport", ("distributed", "disk", "tensor"))
    _check_master_address(s.master_address)
    _require(s.bucket_mb > 0, "sync.bucket_mb", "must be > 0")
    _require(s.probe_tokens >= 1, "sync.probe_tokens", "must be >= 1")
    if s.verify_tolerance is not None:
        _require(s.verify_tolerance > 0, "sync.verify_tolerance", "must be > 0")
    k = c.checkpoint
    _require(c.parallel.distributed_timeout_minutes >= 1, "parallel.distributed_timeout_minutes",
             f"must be >= 1, got {c.parallel.distributed_timeout_minutes}")
    _require(k.every >= 0, "checkpoint.every", "must be >= 0")
    _require(k.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
    _require(k.export_hf_every >= 0, "checkpoint.export_hf_every", "must be >= 0")
    for i, step in enumerate(k.export_hf_steps):
        _require(isinstance(step, int) and step >= 1, f"checkpoint.export_hf_steps[{i}]", f"must be a step >= 1, got {step!r}")
    _choice(k.keep_best_mode, "checkpoint.keep_best_mode", ("max", "min"))
    if k.keep_best.startswith("eval/"):
        _require(c.eval.every > 0, "checkpoint.keep_best", f"{k.keep_best!r} is an evaluation metric: it exists "
                                                           f"only with eval.every > 0")
    _choice(c.logging.level, "logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    _choice(c.logging.wandb.mode, "logging.wandb.mode", ("online", "offline", "disabled"))
    if c.logging.wandb.enabled and c.logging.wandb.mode != "disabled":
        _require(importlib.util.find_spec("wandb") is not None, "logging.wandb.enabled",
                 "the wandb package is not installed (pip install .[wandb]), or set logging.wandb.enabled=false")
    e = c.eval
    _require(e.every >= 0, "eval.every", f"must be >= 0, got {e.every}")
    if e.every:
        _require(not c.supervised, "eval.every", f"in-training evaluation needs the student engine; the "
                                                 f"{c.algorithm.preset!r} preset runs without one (use 0)")
        _require(bool(e.benchmarks), "eval.benchmarks", "must list at least one benchmark file when eval.every > 0")
    _require(e.n >= 1, "eval.n", f"must be >= 1, got {e.n}")
    for i, k in enumerate(e.ks):
        _require(isinstance(k, int) and 1 <= k <= e.n, f"eval.ks[{i}]", f"must be an integer in [1, eval.n], got {k!r}")
    _require(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _require(e.temperature >= 0, "eval.temperature", "must be >= 0")
    _require(bool(c.data.solution_key), "data.solution_key", "must be set")
    _require(c.faults.max_nonfinite_steps >= 0, "faults.max_nonfinite_steps", "must be >= 0")
    _require(c.faults.max_empty_steps >= 1, "faults.max_empty_steps", "must be >= 1")


def _check_teachers(c: Config) -> None:
    """Each teacher has servers or an embedded model; routes name teachers that exist, and every
    extra teacher is routed to."""
    t = c.teacher
    _require(DEFAULT_TEACHER not in t.others, f"teacher.others.{DEFAULT_TEACHER}",
             f"{DEFAULT_TEACHER!r} is the teacher the teacher section itself describes; name the others differently")
    for name, server in t.servers().items():
        prefix = t.field_prefix(name)
        if name != DEFAULT_TEACHER:  # it names the engine's log file and the metrics teacher/NAME/*
            _require(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None, prefix,
                     "a teacher name may hold only letters, digits, '_', '.' and '-'")
        if not server.urls and c.uses_engines:
            _require(bool(server.model), f"{prefix}.model", f"set an HF directory (embedded teacher) or {prefix}.urls")
        if len(server.urls) > 1:
            _require(server.router_url is not None, f"{prefix}.router_url",
                     f"{len(server.urls)} teacher workers need a router URL")
        _require(server.max_concurrency >= 1, f"{prefix}.max_concurrency", "must be >= 1")
        _require(server.embedded_max_batch_size >= 1, f"{prefix}.embedded_max_batch_size", "must be >= 1")
    known = (DEFAULT_TEACHER, *t.others)
    for source, name in t.routes.items():
        _require(name in known, f"teacher.routes.{source}", f"names no teacher: {name!r} is not one of "
                                                            f"{', '.join(map(repr, known))}")
    unused = sorted(set(t.others) - set(t.routes.values()))
    _require(not unused, f"teacher.others.{unused[0]}" if unused else "teacher.others",
             "no route in teacher.routes sends prompts to it (teacher.routes: {data source: name})")
    if t.routes:
        _require(not c.supervised, "teacher.routes", f"algorithm.preset={c.algorithm.preset!r} runs no teacher")
        _require(bool(c.data.source_key), "data.source_key", "teacher.routes route by it: set it")


def _check_replay(c: Config) -> None:
    """``data.replay``: a directory of saved rollouts, and nothing that needs engines or new prompts."""
    from .rollout.replay import missing_steps, resolve_replay_dir

    name = "data.replay"
    directory = resolve_replay_dir(c.data.replay)
    _require(directory.is_dir(), name, f"{c.data.replay!r} is not a directory (a run directory saved with "
                                       f"logging.save_rollouts=true, or its rollouts/)")
    if not c.checkpoint.resume:  # a resumed replay needs only the steps after its checkpoint: checked per step
        missing = missing_steps(directory, 1, c.steps)
        _require(not missing, name, f"{directory} has no rollouts for step(s) {', '.join(map(str, missing[:8]))}"
                                    f"{' ...' if len(missing) > 8 else ''}; replay at most the steps it holds "
                                    f"(steps={c.steps})")
    for field_name, refused, why in (
            ("algorithm.preset", c.supervised, "sft / kd train on the data's solutions, not on rollouts"),
            ("rollout.max_staleness", c.rollout.max_staleness > 0, "a replay generates nothing to overlap (use 0)"),
            ("placement", c.placement == "colocated", "a replay runs no engines to colocate (use separate)"),
            ("algorithm.refill_filtered_groups", c.algorithm.refill_filtered_groups,
             "a replay trains on the saved groups and cannot draw new prompts"),
            ("eval.every", c.eval.every > 0, "a replay runs no student engine to evaluate: use 0, and evaluate "
                                             "exported checkpoints with scope-megatron eval"),
            ("logging.save_rollouts", c.logging.save_rollouts, "it would copy the replayed files (use false)")):
        _require(not refused, field_name, f"not with data.replay: {why}")


def check_world(c: Config, world_size: int) -> None:
    """Checks that need the world size (torchrun's)."""
    p = c.parallel
    mp = p.tp * p.pp * p.cp
    _require(world_size % mp == 0, "parallel", f"world size {world_size} is not divisible by tp*pp*cp = "
                                               f"{p.tp}*{p.pp}*{p.cp}")


def check_colocated_nodes(c: Config, world_size: int, local_world_size: int) -> None:
    """``placement: colocated`` on several nodes (``world_size / local_world_size`` of them): one
    student server per node, each fed in memory by the model replica on its node.

    Each node's engine gets its tensors from its own node (CUDA IPC and shared memory do not cross
    machines), exported by the data-parallel replica whose ranks are all on that node: with
    megatron's rank order (TP fastest, then CP, then DP, pipeline stages outermost) that holds
    when the pipeline has one stage and TP x CP divides the ranks per node."""
    if c.placement != "colocated" or local_world_size < 1 or world_size <= local_world_size:
        return
    _require(world_size % local_world_size == 0, "placement",
             f"{world_size} ranks do not split into nodes of {local_world_size} (LOCAL_WORLD_SIZE)")
    nodes = world_size // local_world_size
    r, p = c.rollout, c.parallel
    _require(not c.embedded_student, "rollout.student_urls",
             f"placement=colocated on {nodes} nodes needs one student server per node, on that node's training "
             "GPUs (launch/slurm/scope.sbatch with COLOCATE=1 starts them): the trainer starts an embedded "
             "engine on its first node only")
    _require(len(r.student_urls) == nodes, "rollout.student_urls",
             f"placement=colocated on {nodes} nodes needs one student server per node, in node order "
             f"(node k's server receives node k's weights in memory); got {len(r.student_urls)}")
    _require(p.pp == 1, "parallel.pp",
             f"placement=colocated on {nodes} nodes feeds each node's engine from the model replica on that "
             "node, but pipeline stages sit on different nodes in megatron's rank order: use parallel.pp=1 "
             "(TP within the node), or placement=separate")
    _require(local_world_size % (p.tp * p.cp) == 0, "parallel.tp",
             f"placement=colocated on {nodes} nodes needs whole model replicas on each node: tp*cp = "
             f"{p.tp}*{p.cp} must divide the {local_world_size} ranks per node")


def _check_master_address(value: str) -> None:
    """``sync.master_address``: ``auto``, a host name or an IP literal (no scheme, no port)."""
    import ipaddress

    name = "sync.master_address"
    _require(bool(value) and value == value.strip(), name, f"must be 'auto', a host name or an IP, got {value!r}")
    if value == "auto":
        return
    _require("://" not in value and "/" not in value, name,
             f"give a host name or IP without a scheme or path (the port is chosen at run time), got {value!r}")
    if ":" in value:  # only an IPv6 literal may contain colons
        try:
            ipaddress.IPv6Address(value.strip("[]"))
        except ValueError:
            raise ConfigError(name, f"give a host name or IP without a port (the port is chosen at run time), "
                                    f"got {value!r}") from None


def _cuda_index(device: str) -> int | None:
    """``cuda`` / ``cuda:N`` -> N (0 for ``cuda``); anything else -> None."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


def check_embedded_devices(c: Config, cuda_device_count: int, local_world_size: int) -> None:
    """Embedded engines never land on a GPU the trainer trains on unless asked.

    Without CUDA (``cuda_device_count == 0``) nothing changes: the engines run on the CPU. With
    CUDA, an embedded engine's ``*.embedded_device`` must be set: this node's trainer ranks use
    ``cuda:0`` .. ``cuda:<local_world_size - 1>`` (torchrun's LOCAL_RANK) and an unset device
    means ``cuda:0``, rank 0's own GPU. With several local ranks a GPU of theirs is refused;
    with one, ``cuda:0`` is accepted when given explicitly (sharing it is then the user's choice).
    A CUDA index must be visible to the trainer (the engine inherits CUDA_VISIBLE_DEVICES).
    """
    if cuda_device_count <= 0 or not c.uses_engines:
        return
    trainer_gpus = f"cuda:0..cuda:{local_world_size - 1}" if local_world_size > 1 else "cuda:0"
    engines = [("student", c.embedded_student, c.rollout.embedded_device, "rollout")]
    engines += [(f"teacher {name!r}" if name != DEFAULT_TEACHER else "teacher", not server.urls,
                 server.embedded_device, c.teacher.field_prefix(name)) for name, server in c.teacher.servers().items()]
    for role, embedded, device, section in engines:
        name, urls = f"{section}.embedded_device", f"{section}.student_urls" if role == "student" else f"{section}.urls"
        if not embedded:
            continue
        _require(device is not None, name,
                 f"the trainer trains on {trainer_gpus} and an embedded {role} engine would default to rank 0's "
                 f"GPU: set {name} to a GPU the trainer does not use (cuda:{local_world_size} or above, visible "
                 f"in CUDA_VISIBLE_DEVICES), to cpu, or (one trainer rank) to cuda:0 to share it on purpose; "
                 f"or serve the {role} with SGLang ({urls})")
        index = _cuda_index(device)
        if index is None:
            continue
        _require(index < cuda_device_count, name,
                 f"{device} is not visible: the trainer sees {cuda_device_count} GPU(s) (CUDA_VISIBLE_DEVICES)")
        if local_world_size > 1:
            _require(index >= local_world_size, name,
                     f"{device} is a training GPU ({local_world_size} trainer ranks on this node use {trainer_gpus}); "
                     f"choose cuda:{local_world_size} or above, or cpu")
