"""The HTTP layer of the embedded engine: SGLang 0.5.23's endpoints in front of
:class:`~scope_megatron.rollout.engine.EmbeddedEngine`.

- :mod:`.routes`: the endpoints (a FastAPI ``APIRouter``), each reading the app's
  :class:`~.routes.ServerState` from ``request.app.state.server``;
- :mod:`.generate`: the ``/generate`` wire format, request parsing and reply building;
- :mod:`.auth`: SGLang's API-key / admin-key rules as ASGI middleware.

``scope_megatron.rollout.embedded_server`` builds the app from these and runs it
(``scope-megatron serve``, or in a thread / subprocess of a trainer or test).
"""
