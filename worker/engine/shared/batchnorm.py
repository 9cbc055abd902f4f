"""Batch-norm statistics re-estimated after a step changed the weights (channel pruning, clustering)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from worker.engine.shared.data import batches

BN_TYPES = nn.modules.batchnorm._BatchNorm
_BN_BATCH = 64


def recalibrate_bn(net: nn.Module, arrays: list[np.ndarray], batch_size: int = _BN_BATCH) -> int:
    """Re-estimate batch-norm running statistics over `arrays`; returns the number of BN layers reset.

    Cumulative averages (momentum=None) over one pass; only the BN layers run in train mode (dropout and
    the like stay in eval), no gradients.
    """
    bns = [m for m in net.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for _, args in batches(arrays, batch_size):
                if args[0].shape[0] > 1:  # BN in train mode refuses a batch of one
                    net(*args)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        net.eval()
    return len(bns)
