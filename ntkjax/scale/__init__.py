"""Kernels at scale: blocks (`blocks`), on-disk stores (`store`), and who
computes them (`executors`). The entry point is `ntkjax.batch`."""

from ntkjax.scale.blocks import BlockJob, BlockPlan
from ntkjax.scale.store import KernelStore, StoredKernel, StoreMismatchError

__all__ = ['BlockJob', 'BlockPlan', 'KernelStore', 'StoredKernel',
           'StoreMismatchError']
