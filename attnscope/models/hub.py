"""Pretrained weights through timm's hub loading and the local Hugging Face cache."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from attnscope.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

_HUB_HINT = (
    "pass `checkpoint` (a local weights file) or `random_init` (random weights, to test a pipeline), "
    "or fill the Hugging Face cache "
    "(HF_HOME / HF_HUB_CACHE) on a machine with access and set HF_HUB_OFFLINE=1"
)


def _hub_endpoint_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's minute of retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """Path of the weights file in the local HF cache, if timm's hub source is cached."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    own = pretrained_cfg.get("hf_hub_filename")
    filenames = [str(own)] if own else []
    filenames += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.exists(found):
            return found
    return None


def pretrained_source(timm_name: str) -> tuple[str, str | None]:
    """Where the tag's weights come from ("hf-hub:..." or "url:...") and their file in the
    local cache; raises, in one line, when they are in neither the cache nor reach."""
    import timm

    arch, _, tag = timm_name.partition(".")
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name if tag else arch)
    except Exception:  # noqa: BLE001 - timm raises various types for unknown tags
        cfg = None
    if cfg is None:
        raise ConfigError(
            None,
            f"timm has no pretrained weights for {timm_name!r}; pass `checkpoint` or `random_init`",
        )
    cfg_dict = cfg.to_dict()
    hub_id = cfg_dict.get("hf_hub_id")
    source = f"hf-hub:{hub_id}" if hub_id else f"url:{cfg_dict.get('url')}"
    cached = _cached_hub_file(cfg_dict)
    if cached is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _hub_endpoint_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
            raise ConfigError(
                None, f"weights for {timm_name} are not in the local cache and {why}; {_HUB_HINT}"
            )
    return source, cached


def _create_pretrained(
    timm_name: str, kwargs: dict[str, Any], found: tuple[str, str | None] | None = None
) -> tuple[nn.Module, str]:
    """The tag's model with its weights; `found`: `pretrained_source` already asked (its
    reachability check is a network round trip, not to be made twice)."""
    import timm

    source, cached = found or pretrained_source(timm_name)
    if cached is not None:
        # Loading through the file override keeps timm's own filter but makes no network
        # request at all, so a cached model works offline.
        model = timm.create_model(
            timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs
        )
        return model, f"{source} (local cache: {cached})"
    try:
        model = timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError as exc:  # network dropped mid-download, gated repo, ...
        raise ConfigError(
            None, f"could not download weights for {timm_name}: {str(exc).splitlines()[0]}; {_HUB_HINT}"
        ) from exc
    return model, source
