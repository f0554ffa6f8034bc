"""SGLang 0.5.23's API-key rules (srt/utils/auth.py) for the embedded server's endpoints."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# SGLang 0.5.23 srt/utils/auth.py:101-106: probes are open, matched by prefix
OPEN_PATH_PREFIXES = ("/health", "/ready", "/metrics")
# the endpoints SGLang 0.5.23 marks @auth_level(AuthLevel.ADMIN_OPTIONAL) (srt/entrypoints/http_server.py)
ADMIN_PATHS = ("/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
               "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update", "/pause_generation",
               "/continue_generation", "/flush_cache", "/abort_request", "/update_weight_version",
               "/get_weights_by_name")


def request_allowed(method: str, path: str, authorization: str | None, api_key: str | None,
                    admin_api_key: str | None) -> bool:
    """SGLang 0.5.23's ``decide_request_auth`` (srt/utils/auth.py:98-151) for this server's endpoints.

    Probes and OPTIONS are open. ADMIN_OPTIONAL endpoints (:data:`ADMIN_PATHS`) need the admin key
    when one is set (the API key is then not accepted), else the API key when one is set, else
    nothing. Every other endpoint needs the API key only when one is set: with only an admin key
    it is open."""
    import secrets

    def bearer_is(expected: str) -> bool:
        parts = (authorization or "").split(" ", 1)
        return len(parts) == 2 and parts[0].lower() == "bearer" and secrets.compare_digest(parts[1], expected)

    if method == "OPTIONS" or path.startswith(OPEN_PATH_PREFIXES):
        return True
    if path in ADMIN_PATHS:
        if admin_api_key:
            return bearer_is(admin_api_key)
        return bearer_is(api_key) if api_key else True
    return bearer_is(api_key) if api_key else True


class AuthMiddleware:
    """:func:`request_allowed` as pure ASGI middleware; 401 ``{"error": "Unauthorized"}`` otherwise
    (SGLang 0.5.23 srt/utils/auth.py:174-204)."""

    def __init__(self, app: Any, api_key: str | None, admin_api_key: str | None):
        self.app = app
        self.api_key = api_key
        self.admin_api_key = admin_api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization")
            if not request_allowed(scope.get("method", "GET"), scope.get("path", ""),
                                   None if header is None else header.decode("latin-1"),
                                   self.api_key, self.admin_api_key):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
