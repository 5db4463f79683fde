"""Layers that give the finite network and its infinite-width kernels.

Every constructor returns a `Layer` `(init_fn, apply_fn, kernel_fn)`; names
and keyword arguments follow neural-tangents' `stax`.
"""

from ntkjax.stax._conv import Conv
from ntkjax.stax._conv_variants import ConvLocal, ConvTranspose
from ntkjax.stax._attention import GlobalSelfAttention
from ntkjax.stax._dropout import Dropout
from ntkjax.stax._graph import Aggregate
from ntkjax.stax._normalization import LayerNorm
from ntkjax.stax._pooling import (AvgPool, Flatten, GlobalAvgPool,
                                 GlobalSumPool, SumPool)
from ntkjax.stax._combinators import (FanInConcat, FanInProd, FanInSum, FanOut,
                                     parallel, repeat, serial)
from ntkjax.stax._elementwise import (ABRelu, Abs, Cos, Elementwise,
                                     ElementwiseNumerical, Elu, Erf, Exp,
                                     Gaussian, Gelu, Hermite, LeakyRelu,
                                     Monomial, Polynomial, Rbf,
                                     RectifiedMonomial, Relu, Selu, Sigmoid,
                                     Sigmoid_like, Sign, Silu, Sin, Softplus,
                                     Tanh)
from ntkjax.stax._features import KernelError
from ntkjax.stax._layer import KernelFn, Layer
from ntkjax.stax._linear import Dense, Identity

__all__ = [
    'ABRelu', 'Aggregate', 'Abs', 'AvgPool', 'Conv', 'ConvLocal', 'ConvTranspose', 'Cos', 'Dense', 'Dropout', 'Flatten',
    'GlobalAvgPool', 'GlobalSelfAttention', 'GlobalSumPool', 'LayerNorm', 'SumPool', 'Elementwise', 'ElementwiseNumerical',
    'Elu', 'Erf', 'Exp', 'FanInConcat', 'FanInProd', 'FanInSum', 'FanOut',
    'Gaussian', 'Gelu', 'Hermite', 'Identity', 'KernelError', 'KernelFn',
    'Layer', 'LeakyRelu', 'Monomial', 'Polynomial', 'Rbf',
    'RectifiedMonomial', 'Relu', 'Selu', 'Sigmoid', 'Sigmoid_like', 'Sign',
    'Silu', 'Sin', 'Softplus', 'Tanh', 'parallel', 'repeat', 'serial',
]


def __dir__():
  # The modules behind the layers are internal (`_conv.py`, ...): dir() and
  # tab completion show the layers, as `from ntkjax.stax import *` does.
  return list(__all__)
