"""Layers that give the finite network and its infinite-width kernels.

Every constructor returns a `Layer` `(init_fn, apply_fn, kernel_fn)`; names
and keyword arguments follow neural-tangents' `stax`.
"""

from ntkjax.stax.conv import Conv
from ntkjax.stax.conv_variants import ConvLocal, ConvTranspose
from ntkjax.stax.attention import GlobalSelfAttention
from ntkjax.stax.dropout import Dropout
from ntkjax.stax.graph import Aggregate
from ntkjax.stax.normalization import LayerNorm
from ntkjax.stax.pooling import (AvgPool, Flatten, GlobalAvgPool,
                                 GlobalSumPool, SumPool)
from ntkjax.stax.combinators import (FanInConcat, FanInProd, FanInSum, FanOut,
                                     parallel, repeat, serial)
from ntkjax.stax.elementwise import (ABRelu, Abs, Cos, Elementwise,
                                     ElementwiseNumerical, Elu, Erf, Exp,
                                     Gaussian, Gelu, Hermite, LeakyRelu,
                                     Monomial, Polynomial, Rbf,
                                     RectifiedMonomial, Relu, Selu, Sigmoid,
                                     Sigmoid_like, Sign, Silu, Sin, Softplus,
                                     Tanh)
from ntkjax.stax.features import KernelError
from ntkjax.stax.layer import KernelFn, Layer
from ntkjax.stax.linear import Dense, Identity

__all__ = [
    'ABRelu', 'Aggregate', 'Abs', 'AvgPool', 'Conv', 'ConvLocal', 'ConvTranspose', 'Cos', 'Dense', 'Dropout', 'Flatten',
    'GlobalAvgPool', 'GlobalSelfAttention', 'GlobalSumPool', 'LayerNorm', 'SumPool', 'Elementwise', 'ElementwiseNumerical',
    'Elu', 'Erf', 'Exp', 'FanInConcat', 'FanInProd', 'FanInSum', 'FanOut',
    'Gaussian', 'Gelu', 'Hermite', 'Identity', 'KernelError', 'KernelFn',
    'Layer', 'LeakyRelu', 'Monomial', 'Polynomial', 'Rbf',
    'RectifiedMonomial', 'Relu', 'Selu', 'Sigmoid', 'Sigmoid_like', 'Sign',
    'Silu', 'Sin', 'Softplus', 'Tanh', 'parallel', 'repeat', 'serial',
]
