"""Build a megatron-core ``GPTModel`` that computes exactly what the HF model of ``ModelArch`` computes.

The settings below are the ones verified against HF transformers for Llama, Qwen2 and Qwen3
(``docs/megatron-notes.md`` §1): RMSNorm with HF's eps, SwiGLU, no linear
biases except Qwen2's QKV bias, Qwen3's q/k norms, ``kv_channels = head_dim``, RoPE theta and
llama3 scaling as GPTModel arguments, dropout 0, and the vocabulary padded to a multiple of
``make_vocab_size_divisible_by x TP`` (padded columns are never part of a log-prob: see
``objective`` and the export path, which strips them).

Layer spec: Transformer Engine when megatron-core can use it (its own ``HAVE_TE``) and CUDA is
present; otherwise megatron's local layers with :class:`SDPAttention` as core attention. The
block's final norm is chosen explicitly (TE's ``TENorm`` or torch's RMSNorm), not by megatron's
import-time default, which is apex's LayerNorm-only ``FusedLayerNorm`` on a machine with apex but
no TE (megatron-core 0.19 ``transformer/transformer_block.py:53-59, 250-254``,
``fusions/fused_layer_norm.py:66-68``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .arch import ModelArch, check_parallel_layout

logger = logging.getLogger(__name__)

LayerImpl = Literal["auto", "te", "local", "local_sdpa"]
Recompute = Literal["none", "selective", "full"]
Switch = Union[bool, Literal["auto"]]  # on, off, or on where this machine can run it
FUSIONS = ("apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "gradient_accumulation_fusion")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"float": torch.float32, "half": torch.float16}


def resolve_dtype(name: str, cuda: bool | None = None, auto: torch.dtype | str | None = None) -> torch.dtype:
    """The torch dtype a ``dtype`` setting names (``float32``/``float``, ``bfloat16``, ``float16``/``half``).

    ``"auto"`` is ``auto`` when given (a checkpoint's or HF config's dtype, a dtype or its name),
    otherwise bf16 on CUDA and fp32 on CPU (``cuda`` defaults to ``torch.cuda.is_available()``).
    Any other name raises ``ValueError``.
    """
    if name == "auto":
        if isinstance(auto, str):
            auto = getattr(torch, auto, None)
        if isinstance(auto, torch.dtype):
            return auto
        if cuda is None:
            cuda = torch.cuda.is_available()
        return torch.bfloat16 if cuda else torch.float32
    dtype = DTYPES.get(name) or _DTYPE_ALIASES.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtype


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class TransformerEngineStatus:
    """Whether megatron-core can use Transformer Engine here, and why not."""

    usable: bool              # megatron-core's HAVE_TE
    installed: bool           # a transformer_engine package is on sys.path
    version: str | None
    error: str | None         # the import error of an installed TE that megatron cannot use
    megatron_broken: bool = False  # TE's import raised something megatron does not catch

    def describe(self) -> str:
        if self.usable:
            return f"Transformer Engine {self.version or '(version unknown)'}"
        if not self.installed:
            return "Transformer Engine is not installed"
        return f"Transformer Engine {self.version or ''} is installed but does not import: {self.error}".replace("  ", " ")


def transformer_engine_status() -> TransformerEngineStatus:
    """Whether megatron-core can use TE: its own ``HAVE_TE`` (``extensions/transformer_engine.py:69-85``:
    ``import transformer_engine`` and ``transformer_engine.pytorch.fp8``), after
    :func:`scope_megatron.device_check.probe_transformer_engine` recorded (and hid) a TE that does
    not import. Deciding by ``find_spec`` instead would pick the TE spec for such a TE and crash on
    ``TESpecProvider`` being None (``models/gpt/gpt_layer_specs.py:46-54, 233``)."""
    from ..device_check import probe_transformer_engine

    probe = probe_transformer_engine()
    if probe.error is not None:
        return TransformerEngineStatus(False, True, probe.version, probe.error)
    try:
        # through the layer specs, as every model build does: importing the extension module first
        # is a circular import in megatron-core 0.19
        from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401
        from megatron.core.extensions import transformer_engine as megatron_te
    except Exception as err:  # megatron was imported before the probe could hide a broken TE
        return TransformerEngineStatus(False, probe.installed, probe.version, f"{type(err).__name__}: {err}",
                                       megatron_broken=True)
    if megatron_te.HAVE_TE:
        return TransformerEngineStatus(True, True, probe.version or getattr(megatron_te.te, "__version__", None), None)
    return TransformerEngineStatus(False, probe.installed, probe.version,
                                   "megatron-core's HAVE_TE is False" if probe.installed else None)


def resolve_layer_impl(impl: LayerImpl = "auto") -> str:
    """The layer implementation to build: "te" for "auto" when megatron can use TE and CUDA is present.

    An installed TE that does not import makes "auto" fall back to "local_sdpa" with a warning that
    quotes the import error, and "te" raise :class:`ValueError` with it.
    """
    status = transformer_engine_status()
    if status.megatron_broken:
        raise RuntimeError(f"importing Transformer Engine raised {status.error}; megatron-core imports it "
                           f"unconditionally and cannot build any model in this environment: fix or "
                           f"uninstall transformer_engine")
    cuda = torch.cuda.is_available()
    if impl == "te":
        if not cuda:
            raise ValueError("layer_impl='te' needs CUDA (torch.cuda.is_available() is False); "
                             f"{status.describe()}")
        if not status.usable:
            raise ValueError(f"layer_impl='te' needs Transformer Engine: {status.describe()}")
        logger.info("layer_impl te: %s", status.describe())
        return "te"
    if impl != "auto":
        return impl
    if status.installed and not status.usable:
        logger.warning("!!! %s. layer_impl=auto falls back to megatron's local layers with SDPA attention "
                       "(much slower on GPU: no fused kernels). Install a Transformer Engine built for this "
                       "torch (see setup.py), or set layer_impl=local_sdpa to choose the fallback.", status.describe())
    if cuda and status.usable:
        logger.info("layer_impl auto -> te: %s", status.describe())
        return "te"
    return "local_sdpa"


@dataclass(frozen=True)
class ModelOptions:
    """How the student is built beyond its architecture: layers, fusions, recompute, sequence parallelism.

    One value the trainer builds from the config (:meth:`from_config`) and passes to
    :func:`build_gpt_model`. The defaults suit any caller without a config: fusions where this
    machine has the kernels (none on CPU), no recompute, no sequence parallelism.
    """

    layer_impl: LayerImpl = "auto"
    recompute: Recompute = "none"        # none | selective (core attention) | full (whole layers)
    recompute_method: Literal["uniform", "block"] = "uniform"  # full only: how layers are grouped
    recompute_num_layers: int = 1        # full only: layers per recompute unit (uniform) / recomputed per stage (block)
    apply_rope_fusion: Switch = "auto"
    bias_activation_fusion: Switch = "auto"
    bias_dropout_fusion: Switch = "auto"
    gradient_accumulation_fusion: Switch = "auto"
    sequence_parallel: Switch = False    # "auto": on when TP > 1

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelOptions":
        """The options of a run's :class:`scope_megatron.config.Config` (``model`` and ``parallel`` sections)."""
        m = cfg.model
        return cls(layer_impl=m.layer_impl, recompute=m.recompute, recompute_method=m.recompute_method,
                   recompute_num_layers=m.recompute_num_layers, apply_rope_fusion=m.apply_rope_fusion,
                   bias_activation_fusion=m.bias_activation_fusion, bias_dropout_fusion=m.bias_dropout_fusion,
                   gradient_accumulation_fusion=m.gradient_accumulation_fusion,
                   sequence_parallel=cfg.parallel.sequence_parallel)


def fusion_unavailable_reasons(cuda: bool | None = None) -> dict[str, str | None]:
    """Why each fusion cannot run here (None: it can), by ``TransformerConfig`` field name.

    * ``apply_rope_fusion``: TE's fused RoPE kernels, which megatron imports as
      ``fused_apply_rotary_pos_emb`` / ``fused_apply_rotary_pos_emb_thd``
      (``models/common/embeddings/rope_utils.py:20-29``; ``TransformerConfig`` refuses the flag when
      both are None, ``transformer/transformer_config.py:2165-2187``). Packed THD rows go through the
      ``_thd`` kernel (``rope_utils.py:318-326``), which, unlike the unfused THD path, never syncs on
      ``cu_seqlens``; both are needed here since micro-batches may be padded or packed.
    * ``bias_activation_fusion`` / ``bias_dropout_fusion``: megatron's ``jit_fuser`` (``torch.compile``,
      ``jit.py``) kernels for SwiGLU and bias-dropout-add; on by default only on CUDA (on CPU inductor
      would compile C++ for no gain).
    * ``gradient_accumulation_fusion``: apex's ``fused_weight_gradient_mlp_cuda``. The output layer is
      megatron's own ``ColumnParallelLinear`` on every spec, and it raises without that extension even
      when the transformer layers are TE's (``tensor_parallel/layers.py:49-53, 1070-1078``).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return {name: "needs CUDA" for name in FUSIONS}
    status = transformer_engine_status()
    rope = None
    if not status.usable:
        rope = f"needs Transformer Engine's fused RoPE ({status.describe()})"
    else:
        from megatron.core.models.common.embeddings import rope_utils

        if rope_utils.fused_apply_rotary_pos_emb is None or rope_utils.fused_apply_rotary_pos_emb_thd is None:
            rope = "this Transformer Engine has no fused RoPE kernels (megatron wants TE >= 1.4)"
    from megatron.core.tensor_parallel import layers

    accumulation = None if layers._grad_accum_fusion_available else \
        "needs apex's fused_weight_gradient_mlp_cuda extension (megatron's output layer uses it even with TE)"
    return {"apply_rope_fusion": rope, "bias_activation_fusion": None, "bias_dropout_fusion": None,
            "gradient_accumulation_fusion": accumulation}


def resolve_fusions(options: ModelOptions, cuda: bool | None = None,
                    unavailable: dict[str, str | None] | None = None) -> dict[str, bool]:
    """Each fusion's setting, on or off: ``"auto"`` is on where the kernel exists, ``True`` without it
    raises :class:`ConfigError` naming ``model.<field>``. Logs the resolved set."""
    unavailable = fusion_unavailable_reasons(cuda) if unavailable is None else unavailable
    resolved = {}
    for name in FUSIONS:
        value = getattr(options, name)
        if value not in (True, False, "auto"):
            raise ConfigError(f"model.{name}", f"must be true, false or auto, got {value!r}")
        reason = unavailable.get(name)
        if value is True and reason is not None:
            raise ConfigError(f"model.{name}", f"cannot be enabled here: {reason}; use auto or false")
        resolved[name] = value is True or (value == "auto" and reason is None)
    off = {name: unavailable[name] for name in FUSIONS if not resolved[name] and getattr(options, name) == "auto"}
    logger.info("fusions: %s%s", ", ".join(f"{name}={'on' if on else 'off'}" for name, on in resolved.items()),
                "".join(f"; {name} off: {why}" for name, why in off.items() if why and why != "needs CUDA")
                or ("; none on CPU" if off and all(why == "needs CUDA" for why in off.values()) else ""))
    return resolved


def resolve_sequence_parallel(value: Switch, tp: int) -> bool:
    """``parallel.sequence_parallel``: ``"auto"`` is on when ``tp > 1``; ``True`` at TP1 raises
    :class:`ConfigError` (megatron refuses it, ``model_parallel_config.py:502-504``)."""
    if value not in (True, False, "auto"):
        raise ConfigError("parallel.sequence_parallel", f"must be true, false or auto, got {value!r}")
    if value is True and tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor parallelism (parallel.tp > 1); use auto or false")
    return tp > 1 and value in (True, "auto")


def recompute_settings(options: ModelOptions, layers_per_stage: int) -> dict[str, Any]:
    """megatron ``TransformerConfig`` keywords for ``options.recompute``.

    ``selective`` recomputes core attention only (``recompute_modules=["core_attn"]``: the [s, s]
    scores of the unfused / SDPA math path, nothing for TE's flash attention); ``full`` recomputes
    whole layers: ``uniform`` checkpoints groups of ``recompute_num_layers`` layers (only each
    group's input is kept), ``block`` checkpoints the first ``recompute_num_layers`` layers of each
    pipeline stage and keeps the rest (``transformer/transformer_block.py`` ``_checkpointed_forward``).
    """
    if options.recompute == "none":
        return {}
    if options.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if options.recompute != "full":
        raise ConfigError("model.recompute", f"must be none, selective or full, got {options.recompute!r}")
    if options.recompute_method not in ("uniform", "block"):
        raise ConfigError("model.recompute_method", f"must be uniform or block, got {options.recompute_method!r}")
    if not 1 <= options.recompute_num_layers <= layers_per_stage:
        raise ConfigError("model.recompute_num_layers", f"must be in [1, {layers_per_stage}] (layers per pipeline "
                                                        f"stage), got {options.recompute_num_layers}")
    return {"recompute_granularity": "full", "recompute_method": options.recompute_method,
            "recompute_num_layers": options.recompute_num_layers}


class TorchRMSNorm:
    """torch's RMSNorm for megatron's local layers, usable with sequence parallelism.

    The same module megatron's ``WrappedTorchNorm`` builds (``transformer/torch_norm.py:56-70``),
    which refuses ``sequence_parallel`` (``:50``) only because it leaves the weight unmarked. Under
    sequence parallelism each TP rank normalises its own slice of the sequence, so the weight's
    gradient is a partial sum; ``finalize_model_grads`` sums it over TP for parameters marked
    ``sequence_parallel`` (``distributed/finalize_model_grads.py:452-454``), the mark megatron's
    ``FusedLayerNorm`` sets (``fusions/fused_layer_norm.py:116-120``). q/k norms are summed over TP
    by name either way (their heads differ per rank).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "RMSNorm") -> torch.nn.Module:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("TorchRMSNorm builds plain RMSNorm only")
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(arch: ModelArch, impl: LayerImpl = "auto"):
    """The megatron-core ``ModuleSpec`` of one transformer layer for ``arch``."""
    from megatron.core.models.gpt import gpt_layer_specs

    impl = resolve_layer_impl(impl)
    if impl == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = TorchRMSNorm
    if arch.qk_layernorm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = TorchRMSNorm
    if impl == "local_sdpa":
        from .sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def final_norm_class(impl: str):
    """The block's final norm for a resolved ``impl``: TE's ``TENorm`` (RMSNorm from the config) on
    the TE path, else :class:`TorchRMSNorm` (torch's RMSNorm), whatever apex is present."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchRMSNorm


def block_spec(arch: ModelArch, config, impl: LayerImpl = "auto"):
    """``TransformerBlockSubmodules`` for this pipeline stage: its layers and an explicit final norm.

    The same as megatron's wrapping of a layer spec (``transformer/transformer_block.py:247-254``:
    ``get_num_layers_to_build`` copies of the layer) with ``layer_norm`` chosen here instead of by
    megatron's ``LayerNormImpl``.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    impl = resolve_layer_impl(impl)
    layer = layer_spec(arch, impl)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=final_norm_class(impl))


def transformer_config(arch: ModelArch, *, params_dtype: torch.dtype = torch.float32,
                       use_cpu_initialization: bool | None = None, perform_initialization: bool = True,
                       calculate_per_token_loss: bool = True, options: ModelOptions | None = None,
                       recompute: bool | str | None = None):
    """A ``TransformerConfig`` for ``arch`` at the parallel layout megatron's parallel_state holds.

    ``options`` sets fusions, recompute and sequence parallelism (see :class:`ModelOptions`);
    ``recompute`` overrides ``options.recompute`` (``True`` means ``"full"``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    options = _with_overrides(options, recompute=recompute)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    check_parallel_layout(arch, tp, pp)
    on_gpu = torch.cuda.is_available()
    fusions = resolve_fusions(options, cuda=on_gpu)
    sequence_parallel = resolve_sequence_parallel(options.sequence_parallel, tp)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        # every micro-batch has its own [b, s]; megatron requires the alltoall flag for it.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=calculate_per_token_loss,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        perform_initialization=perform_initialization,
        # masked_softmax_fusion serves megatron's unfused attention with an explicit mask; persist_layer_norm
        # is apex's LayerNorm: neither is on the path of these models (SDPA / TE attention, RMSNorm)
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **fusions,
        sequence_parallel=sequence_parallel,
        deallocate_pipeline_outputs=on_gpu,
        **recompute_settings(options, arch.num_layers // pp),
    )
    logger.info("recompute: %s; sequence_parallel: %s (tp=%d)", _describe_recompute(options),
                "on" if sequence_parallel else "off", tp)
    return TransformerConfig(**kwargs)


def _describe_recompute(options: ModelOptions) -> str:
    if options.recompute == "full":
        return f"full ({options.recompute_method}, {options.recompute_num_layers} layer(s))"
    return "selective (core attention)" if options.recompute == "selective" else "none"


def _with_overrides(options: ModelOptions | None, *, impl: str | None = None,
                    recompute: bool | str | None = None) -> ModelOptions:
    """``options`` (default :class:`ModelOptions`) with an explicit ``impl`` / ``recompute`` argument applied."""
    options = options if options is not None else ModelOptions()
    changes: dict[str, Any] = {}
    if impl is not None:
        changes["layer_impl"] = impl
    if recompute is not None:
        changes["recompute"] = {True: "full", False: "none"}.get(recompute, recompute) \
            if isinstance(recompute, bool) else recompute
    return dataclasses.replace(options, **changes) if changes else options


def build_gpt_model(arch: ModelArch, *, params_dtype: torch.dtype = torch.float32, options: ModelOptions | None = None,
                    impl: LayerImpl | None = None, perform_initialization: bool = True,
                    make_vocab_size_divisible_by: int = 128, calculate_per_token_loss: bool = True,
                    recompute: bool | str | None = None, device: str | None = None):
    """This rank's pipeline stage of the student, on ``device`` (default: CUDA if present, else CPU).

    Megatron's parallel state must be initialised (:func:`scope_megatron.parallel.init_parallel`).
    ``options`` (a run's: ``ModelOptions.from_config(cfg)``) picks layers, fusions, recompute and
    sequence parallelism; ``impl`` / ``recompute``, when given, override its ``layer_impl`` /
    ``recompute`` (``True`` means full recompute). The output layer returns vocab-parallel logits
    [s, b, V_padded / TP] when called without labels, for the whole sequence also under sequence
    parallelism (whose micro-batches need s, or a packed row's T, a multiple of TP:
    :func:`sequence_length_multiple`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    options = _with_overrides(options, impl=impl, recompute=recompute)
    on_gpu = torch.cuda.is_available() if device is None else device != "cpu"
    config = transformer_config(arch, params_dtype=params_dtype, perform_initialization=perform_initialization,
                                calculate_per_token_loss=calculate_per_token_loss, options=options,
                                use_cpu_initialization=not on_gpu)
    tp = ps.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, options.layer_impl),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        rope_scaling=arch.llama3_rope_factor is not None,
        rope_scaling_factor=arch.llama3_rope_factor or 8.0,
    )
    model.true_vocab_size = arch.vocab_size  # columns at or beyond this are padding
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    return model


def sequence_length_multiple(sequence_parallel: bool, tp: int, cp: int = 1) -> int:
    """What every micro-batch's sequence dimension must be a multiple of (padded s, packed T).

    Sequence parallelism splits the sequence over the TP ranks (``tensor_parallel/mappings.py``
    ``_split_along_first_dim`` asserts divisibility); under context parallelism each CP rank's part
    (T / cp, from slots that are multiples of 2 * cp) is what TP splits, so the row is padded to
    ``tp * 2 * cp``.
    """
    if not sequence_parallel or tp == 1:
        return 1
    return tp * (2 * cp if cp > 1 else 1)
