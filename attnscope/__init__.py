"""attnscope: look inside Vision Transformers.

Notebook use::

    import attnscope
    result = attnscope.analyze("mae", images="photos/")
    result.layers  # model, layer, metric, mean, std, count
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "AttentionRecorder",
    "AttnscopeError",
    "ClusterScores",
    "ConfigError",
    "Embedding",
    "METRICS",
    "MetricAccumulator",
    "TokenLayout",
    "analyze",
    "block_metrics",
    "cluster_scores",
    "embed_2d",
    "list_model_specs",
    "load_model",
    "token_layout",
    "__version__",
]

# Lazy attributes keep `import attnscope` (and so `attnscope --help`) free of torch.
_LAZY = {
    "AnalysisResult": "attnscope.analysis",
    "analyze": "attnscope.analysis",
    "AttentionRecorder": "attnscope.capture",
    "METRICS": "attnscope.metrics",
    "MetricAccumulator": "attnscope.metrics",
    "block_metrics": "attnscope.metrics",
    "ClusterScores": "attnscope.embedding",
    "Embedding": "attnscope.embedding",
    "cluster_scores": "attnscope.embedding",
    "embed_2d": "attnscope.embedding",
    "TokenLayout": "attnscope.models",
    "list_model_specs": "attnscope.models",
    "load_model": "attnscope.models",
    "token_layout": "attnscope.models",
}

from attnscope.errors import AttnscopeError, ConfigError  # noqa: E402

if TYPE_CHECKING:
    from attnscope.analysis import AnalysisResult, analyze
    from attnscope.capture import AttentionRecorder
    from attnscope.embedding import ClusterScores, Embedding, cluster_scores, embed_2d
    from attnscope.metrics import METRICS, MetricAccumulator, block_metrics
    from attnscope.models import TokenLayout, list_model_specs, load_model, token_layout


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnscope' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    # the lazy names too, so tab completion and dir(attnscope) show the public API
    return sorted(set(globals()) | set(__all__))
