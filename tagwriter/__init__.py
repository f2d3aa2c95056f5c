"""tagwriter: a store-and-forward writer for industrial tag values.

The core is a library:

    from tagwriter import Pipeline, PollingData, load_config
    with Pipeline(load_config()) as pipeline:
        pipeline.submit(PollingData("line1", ts, {"line1.temp": 21.5}))

The names below are imported on first use, so `import tagwriter.cli` (the
command's entry point) can install its signal handlers before the core loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tagwriter._version import __version__

if TYPE_CHECKING:
    from tagwriter.config import Config
    from tagwriter.config import load as load_config
    from tagwriter.metrics import MetricsSnapshot
    from tagwriter.models import GOOD_QUALITY, PollingData, TagValue
    from tagwriter.pipeline import Pipeline

_LAZY = {
    "Config": ("tagwriter.config", "Config"),
    "load_config": ("tagwriter.config", "load"),
    "MetricsSnapshot": ("tagwriter.metrics", "MetricsSnapshot"),
    "GOOD_QUALITY": ("tagwriter.models", "GOOD_QUALITY"),
    "PollingData": ("tagwriter.models", "PollingData"),
    "TagValue": ("tagwriter.models", "TagValue"),
    "Pipeline": ("tagwriter.pipeline", "Pipeline"),
}

__all__ = [
    "GOOD_QUALITY",
    "Config",
    "MetricsSnapshot",
    "Pipeline",
    "PollingData",
    "TagValue",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tagwriter' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
