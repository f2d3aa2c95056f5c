"""tagwriter: a store-and-forward writer for industrial tag values.

The core is a library:

    from tagwriter import Pipeline, PollingData, load_config
    with Pipeline(load_config()) as pipeline:
        pipeline.submit(PollingData("line1", ts, {"line1.temp": 21.5}))
"""

from tagwriter.config import Config
from tagwriter.config import load as load_config
from tagwriter.metrics import MetricsSnapshot
from tagwriter.models import GOOD_QUALITY, PollingData, TagValue
from tagwriter.pipeline import Pipeline

__version__ = "0.1.0"

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
