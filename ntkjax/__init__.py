"""ntkjax: finite and infinite-width neural networks from one definition."""

from ntkjax import finite_width, hyper, predict, signal, spectrum, stax
from ntkjax.batching import batch
from ntkjax.empirical import (NtkImplementation, empirical_kernel_fn,
                              empirical_nngp_fn, empirical_ntk_fn,
                              ntk_implementation_costs)
from ntkjax.kernel import Kernel
from ntkjax.linearize import linearize, taylor_expand
from ntkjax.monte_carlo import monte_carlo_kernel_fn
from ntkjax.stax import KernelError, Layer
from ntkjax.training import TrainResult, train

__version__ = '0.1.0'

__all__ = ['Kernel', 'KernelError', 'Layer', 'NtkImplementation', 'batch',
           'finite_width', 'hyper', 'signal', 'spectrum',
           'empirical_kernel_fn', 'empirical_nngp_fn', 'empirical_ntk_fn',
           'ntk_implementation_costs',
           'linearize', 'monte_carlo_kernel_fn', 'predict', 'stax', 'taylor_expand',
           'TrainResult', 'train']

_ESTIMATORS = ('NNGPClassifier', 'NNGPRegressor', 'NTKClassifier',
               'NTKRegressor')
__all__ += list(_ESTIMATORS)


def __getattr__(name):
  # The estimators import scikit-learn when it is installed (about a second);
  # load them on first use only.
  if name in _ESTIMATORS:
    from ntkjax import estimators
    return getattr(estimators, name)
  raise AttributeError(f'module ntkjax has no attribute {name!r}')
