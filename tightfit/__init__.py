"""tightfit: fit large language models to small hardware."""

from .models import LoadedModel, load

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load"]
