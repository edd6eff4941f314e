"""tightfit: fit large language models to small hardware."""

import os

# torch backs its large CPU tensors with transparent huge pages when this is set before it is imported (this
# kernel's THP mode is "madvise"): a quantize of the 1.5B shape spent half its time in the kernel's page faults
# and zeroing of fresh 4 KiB pages, 62 -> 43 s here. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .models import LoadedModel, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load"]
