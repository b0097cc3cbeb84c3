"""Request guards: Host/Origin checks against DNS rebinding and CSRF, and the access token.

A browser page on another site can send POSTs to 127.0.0.1; refusing state-changing
requests whose Origin is not this server (including the opaque `null` origin) stops it.
Checking Host stops a rebound DNS name from reading the API.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

UNSAFE_METHODS = {"POST", "PUT", "DELETE", "PATCH"}
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
TOKEN_COOKIE = "tessera_token"
SOCKET_PATHS = ("/ws", "/comfyui/ws")  # WebSockets: a browser sends no preflight, so Origin is checked


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class RequestGuard:
    def __init__(self, host: str, port: int, token: str | None):
        if token is not None and len(token) < MIN_TOKEN_CHARS:  # '' would let every request in
            raise ValueError(
                f"the access token must have at least {MIN_TOKEN_CHARS} characters (got {len(token)})"
            )
        self.port = port
        self.token = token
        self.any_host = host in ("0.0.0.0", "::", "")
        names = set(LOOPBACK_NAMES) | {host, f"[{host}]" if ":" in host else host}
        self.allowed_hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())

    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        return self.any_host or host_header.lower() in self.allowed_hosts

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        if origin == "null":
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower()

    def token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = (
            _bearer(request.headers.get("Authorization", ""))
            or request.query.get("token", "")
            or request.cookies.get(TOKEN_COOKIE, "")
        )
        return hmac.compare_digest(given.encode(), self.token.encode())  # constant-time

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return web.json_response({"error": f"host {host!r} is not this server"}, status=403)
        if request.method in UNSAFE_METHODS or request.path in SOCKET_PATHS:
            origin = request.headers.get("Origin")
            if origin is not None and not self.origin_allowed(origin, host):
                return web.json_response(
                    {"error": f"cross-origin request from {origin!r} refused"}, status=403
                )
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                return web.json_response({"error": "cross-site request refused"}, status=403)
        if not self.token_ok(request):
            if request.path.startswith(("/api", "/ws", "/comfyui/api", "/comfyui/ws")):
                return web.json_response({"error": "missing or wrong access token"}, status=401)
            return web.Response(status=401, text="Tessera: open the URL with ?token=… printed at start.")
        response = await handler(request)
        if self.token is not None and request.query.get("token") and isinstance(response, web.StreamResponse):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
        return response
