"""A small Kubernetes REST client (stdlib + PyYAML): JSON dicts in and out, nothing typed.

Authenticates as the kubeconfig's current user: a client certificate (as the test control plane
gives) or a bearer token.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    def __init__(self, kubeconfig: Path):
        config = yaml.safe_load(Path(kubeconfig).read_text())
        context = _named(config["contexts"], config["current-context"])["context"]
        cluster = _named(config["clusters"], context["cluster"])["cluster"]
        user = _named(config["users"], context["user"])["user"]
        self.server = cluster["server"].rstrip("/")
        self.ssl = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            self.ssl.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif "certificate-authority" in cluster:
            self.ssl.load_verify_locations(cafile=cluster["certificate-authority"])
        self.token = user.get("token")
        if "client-certificate-data" in user:
            with tempfile.TemporaryDirectory() as d:  # ssl loads a key pair from files only
                cert, key = Path(d) / "cert", Path(d) / "key"
                cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
                key.write_bytes(base64.b64decode(user["client-key-data"]))
                self.ssl.load_cert_chain(cert, key)
        elif "client-certificate" in user:
            self.ssl.load_cert_chain(user["client-certificate"], user["client-key"])

    def request(self, method: str, path: str, body=None, content_type: str = "application/json",
                query: dict | None = None, timeout: float = 10) -> dict:
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(text) if text else {}

    # -- shorthands ------------------------------------------------------------------------------
    def get(self, path: str, **query) -> dict:
        return self.request("GET", path, query=query or None)

    def items(self, path: str, **query) -> list[dict]:
        return self.get(path, **query).get("items") or []

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, strategic: bool = False) -> dict:
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return self.request("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self.request("DELETE", path, body)


def _named(entries: list[dict], name: str) -> dict:
    return next(e for e in entries if e["name"] == name)


def ns_path(namespace: str, plural: str, name: str = "", sub: str = "", group: str = "") -> str:
    base = f"/apis/{group}" if group else "/api/v1"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
