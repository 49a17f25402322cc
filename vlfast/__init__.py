"""vlfast: fused GPU kernels for vision-language pretraining, and a thin trainer that uses them."""
from vlfast import ops

__all__ = ["ops"]
__version__ = "0.1.0"
