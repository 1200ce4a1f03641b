"""Prompt embeddings over HTTP: the server side's encoding and a client that stands in for a local text encoder.

Contract:
    POST /v1/text/embeddings {"prompts": [str, ...]} -> safetensors bytes holding one tensor "embeddings"
        (B, T, C) in the encoder's dtype, with the same shape and dtype in the headers X-Fluxrt-Shape ("B,T,C") and
        X-Fluxrt-Dtype, and the spec name in the safetensors metadata.
    GET /v1/text/info -> {"spec", "text_encoder": TextEncoderConfig fields, "system_message", "dtype"}
    RemoteTextEncoder(url, token=None, timeout=300.0, expect=None)
        .encode(prompts) -> Tensor (B, T, C) on the CPU, equal to the server's local `encode`; `.config` and
        `.system_message` as a local TextEncoder has them (so a Pipeline caches its features the same way);
        `.to(...)` is a no-op. `expect`: the TextEncoderConfig the caller's model needs; another one raises.
        token: the bearer token, default $FLUXRT_TOKEN. Only http and https URLs; the standard library's urllib,
        no extra dependency.
This module imports no server library: a client machine needs neither FastAPI nor the text-encoder weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..config import TextEncoderConfig

ENV_TOKEN = "FLUXRT_TOKEN"
TENSOR = "embeddings"


# --------------------------------------------------------------------------------------------- server side
def text_info(spec, te) -> dict:
    dtype = getattr(te, "dtype", None)
    return {"spec": spec.name, "text_encoder": dataclasses.asdict(spec.text_encoder),
            "system_message": getattr(te, "system_message", None),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}  # fmt: skip


@torch.no_grad()
def encode_embeddings(encode, prompts: list[str]) -> tuple[bytes, dict]:
    """encode(prompts) -> (B, T, C) features, as safetensors bytes and the shape / dtype headers."""
    feats = encode(list(prompts)).detach().to("cpu").contiguous()  # (B, T, C)
    shape = ",".join(str(d) for d in feats.shape)
    dtype = str(feats.dtype).removeprefix("torch.")
    data = st_save({TENSOR: feats}, metadata={"shape": shape, "dtype": dtype})
    return data, {"X-Fluxrt-Shape": shape, "X-Fluxrt-Dtype": dtype}


# --------------------------------------------------------------------------------------------- client side
class RemoteTextEncoder:
    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0,
                 expect: TextEncoderConfig | None = None):  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"text encoder URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(ENV_TOKEN)
        self.timeout = timeout
        info = json.loads(self._call("GET", "/v1/text/info"))
        cfg = dict(info["text_encoder"])
        cfg["output_layers"] = tuple(cfg["output_layers"])
        self.config = TextEncoderConfig(**cfg)
        self.system_message = info.get("system_message")
        self.spec_name = info.get("spec")
        if expect is not None and self.config != expect:
            raise ValueError(f"the text encoder at {self.url} serves {self.spec_name!r} ({self.config}); this model "
                             f"needs {expect}")  # fmt: skip

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        headers = {"Accept": "application/json, application/octet-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise RuntimeError(f"text encoder at {self.url}{path}: HTTP {e.code}: {message}") from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"text encoder at {self.url} is unreachable: {e.reason}") from None

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return st_load(self._call("POST", "/v1/text/embeddings", {"prompts": prompts}))[TENSOR]

    def to(self, *args, **kwargs) -> RemoteTextEncoder:
        return self  # the weights live on the server

    def __repr__(self) -> str:
        return f"RemoteTextEncoder({self.url!r}, spec={self.spec_name!r})"
