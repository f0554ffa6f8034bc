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

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .arch import ModelArch, check_parallel_layout

logger = logging.getLogger(__name__)

LayerImpl = Literal["auto", "te", "local", "local_sdpa"]
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


def layer_spec(arch: ModelArch, impl: LayerImpl = "auto"):
    """The megatron-core ``ModuleSpec`` of one transformer layer for ``arch``."""
    from megatron.core.models.gpt import gpt_layer_specs

    impl = resolve_layer_impl(impl)
    if impl == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    if impl == "local_sdpa":
        from .sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def final_norm_class(impl: str):
    """The block's final norm for a resolved ``impl``: TE's ``TENorm`` (RMSNorm from the config) on
    the TE path, else megatron's ``WrappedTorchNorm`` (torch's RMSNorm), whatever apex is present."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


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
                       calculate_per_token_loss: bool = True, recompute: bool = False):
    """A ``TransformerConfig`` for ``arch`` at the parallel layout megatron's parallel_state holds."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    check_parallel_layout(arch, tp, pp)
    on_gpu = torch.cuda.is_available()
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
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=on_gpu,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def build_gpt_model(arch: ModelArch, *, params_dtype: torch.dtype = torch.float32, impl: LayerImpl = "auto",
                    perform_initialization: bool = True, make_vocab_size_divisible_by: int = 128,
                    calculate_per_token_loss: bool = True, recompute: bool = False, device: str | None = None):
    """This rank's pipeline stage of the student, on ``device`` (default: CUDA if present, else CPU).

    Megatron's parallel state must be initialised (:func:`scope_megatron.parallel.init_parallel`).
    The output layer returns vocab-parallel logits [s, b, V_padded / TP] when called without labels.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    on_gpu = torch.cuda.is_available() if device is None else device != "cpu"
    config = transformer_config(arch, params_dtype=params_dtype, perform_initialization=perform_initialization,
                                calculate_per_token_loss=calculate_per_token_loss, recompute=recompute,
                                use_cpu_initialization=not on_gpu)
    tp = ps.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, impl),
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
