"""The embedded engine: a transformers model that behaves as an SGLang 0.5.23 engine.

Read it one concern at a time:

- :mod:`.request`: :class:`EngineConfig`, :class:`GenRequest` (one sequence and its state),
  :class:`EngineError` / :class:`EngineFatal`, the per-token weight-version spans;
- :mod:`.scheduler`: the worker thread, the queues, pause modes, aborts, the update lock and
  the two weight versions;
- :mod:`.sampling`: log-probs, penalties, top-k/top-p/min-p sampling, stop checks;
- :mod:`.weights`: the weight-update protocol (sessions, broadcast groups, SGLang's per-name
  load rules);
- :mod:`.embedded`: :class:`EmbeddedEngine`, the model runner that puts them together.

The HTTP layer in front of it is :mod:`scope_megatron.rollout.server` (``scope-megatron serve``:
:mod:`scope_megatron.rollout.embedded_server`). Semantics and their SGLang source lines are in
``docs/sglang-protocol.md`` §1, §4.
"""

from .embedded import EmbeddedEngine
from .request import EngineConfig, EngineError, EngineFatal, GenRequest, compute_weight_version_spans

__all__ = ["EmbeddedEngine", "EngineConfig", "EngineError", "EngineFatal", "GenRequest",
           "compute_weight_version_spans"]
