"""Models: which ViT a name means, how to load its weights, and how its tokens are laid out.

One concern per module, as timm splits its own (`_registry`, `_hub`, `_builder`):
`registry` (aliases and families), `source` (a checkpoint file or Hugging Face folder given
as the model: its architecture read from it), `hub` (pretrained weights and the local cache),
`checkpoints` (local files as published), `converters/` (one module per family's release
layout), `preprocessing` (the eval transform and where it came from), `capi` (CAPI's encoder,
which timm lacks), `loading` (`load_model`, `LoadedModel`), `layout` (`TokenLayout`) and
`device`. Capture and metrics never guess a layout: no `sqrt(N)`,
no "token 0 is the class token".
"""

from attnscope.models.checkpoints import load_checkpoint_into, read_checkpoint
from attnscope.models.device import resolve_device
from attnscope.models.layout import TokenLayout, token_layout
from attnscope.models.loading import (
    LoadedModel,
    display_name,
    load_model,
    model_data_config,
    random_weights_warning,
)
from attnscope.models.preprocessing import DataConfig, parse_data_config
from attnscope.models.registry import (
    FAMILIES,
    MODEL_REGISTRY,
    SHORT_ALIASES,
    ModelSpec,
    aliases_of,
    list_model_specs,
    resolve_model_spec,
)
from attnscope.models.source import resolve_model

__all__ = [
    "FAMILIES",
    "DataConfig",
    "MODEL_REGISTRY",
    "SHORT_ALIASES",
    "LoadedModel",
    "ModelSpec",
    "TokenLayout",
    "aliases_of",
    "display_name",
    "list_model_specs",
    "load_checkpoint_into",
    "load_model",
    "model_data_config",
    "parse_data_config",
    "random_weights_warning",
    "read_checkpoint",
    "resolve_device",
    "resolve_model",
    "resolve_model_spec",
    "token_layout",
]
