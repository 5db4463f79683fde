"""ntkjax: finite and infinite-width neural networks from one definition."""

from ntkjax import stax
from ntkjax.kernel import Kernel
from ntkjax.stax import KernelError, Layer

__version__ = '0.1.0'

__all__ = ['Kernel', 'KernelError', 'Layer', 'stax']
