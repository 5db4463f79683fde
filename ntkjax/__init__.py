"""ntkjax: finite and infinite-width neural networks from one definition."""

from ntkjax import predict, stax
from ntkjax.empirical import (NtkImplementation, empirical_kernel_fn,
                              empirical_nngp_fn, empirical_ntk_fn,
                              ntk_implementation_costs)
from ntkjax.kernel import Kernel
from ntkjax.linearize import linearize, taylor_expand
from ntkjax.monte_carlo import monte_carlo_kernel_fn
from ntkjax.stax import KernelError, Layer

__version__ = '0.1.0'

__all__ = ['Kernel', 'KernelError', 'Layer', 'NtkImplementation',
           'empirical_kernel_fn', 'empirical_nngp_fn', 'empirical_ntk_fn',
           'ntk_implementation_costs',
           'linearize', 'monte_carlo_kernel_fn', 'predict', 'stax', 'taylor_expand']
