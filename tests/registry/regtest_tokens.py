"""A small docker-distribution token endpoint for tests: JWTs signed with our own key.

The registry (`auth: token`) trusts the self-signed certificate in `rootcertbundle`; distribution
looks the signing key up by the JWT header's `kid`, which must be the libtrust key ID of the
certificate's public key: SHA-256 of the DER SubjectPublicKeyInfo, first 30 bytes, base32
without padding, in 4-character groups joined by ':'.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

USERS = {"alice": "wonderland", "bob": "builder"}


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i : i + 4] for i in range(0, len(s), 4))


def make_signing_cert(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazybench test token issuer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "token-root.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, path


@dataclass
class TokenServer:
    """GET /token?service=S&scope=repository:NAME:ACTIONS with optional Basic auth.

    Known users get every action they ask for; wrong passwords get 401; anonymous callers get
    `pull` on repositories listed in `anonymous_pull` and nothing else.
    """

    key: ec.EllipticCurvePrivateKey
    issuer: str
    service: str
    users: Mapping[str, str] = field(default_factory=dict)
    anonymous_pull: tuple[str, ...] = ()
    expires_in: int = 300
    refresh_tokens: Mapping[str, str] = field(default_factory=dict)  # token -> user
    requests: list[dict[str, object]] = field(default_factory=list)
    # Serve HTTPS with this PEM certificate and key (None: plain HTTP).
    tls: tuple[Path, Path] | None = None
    _server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}/token"

    def issue(self, subject: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        kid = libtrust_key_id(self.key.public_key())
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": kid})

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        q = parse_qs(urlsplit(handler.path).query)
        user = ""
        auth = handler.headers.get("Authorization", "")
        if handler.command == "POST":  # OAuth2 refresh-token grant (docker `identitytoken`)
            length = int(handler.headers.get("Content-Length") or 0)
            q = parse_qs(handler.rfile.read(length).decode())
            user = self.refresh_tokens.get((q.get("refresh_token") or [""])[0], "")
            if q.get("grant_type") != ["refresh_token"] or not user:
                self.requests.append({"user": user, "ok": False})
                handler.send_response(401)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        elif auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != pw:
                self.requests.append({"user": user, "ok": False})
                handler.send_response(401)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        access = []
        for scope in q.get("scope", []):  # GET: repeated; POST: space-separated
            for one in scope.split(" "):
                typ, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                wanted = [a for a in actions.split(",") if a]
                if not user:
                    wanted = [a for a in wanted if a == "pull" and name in self.anonymous_pull]
                access.append({"type": typ, "name": name, "actions": wanted})
        self.requests.append({"user": user, "ok": True, "scope": q.get("scope", [])})
        body = json.dumps(
            {"token": self.issue(user or "anonymous", access), "expires_in": self.expires_in}
        ).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self) -> TokenServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner._handle(self)

            def do_POST(self) -> None:
                owner._handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
