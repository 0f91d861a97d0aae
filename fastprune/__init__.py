"""fastprune: train each epoch only on the samples that still teach the model something.

    pruner = fastprune.DynamicPruner(num_samples=len(ds), num_classes=1000, epochs=90)
    loss = pruner.step(logits, labels, indices)   # fused loss + gradient + score update
    order = pruner.next_epoch()                   # the next epoch's shuffled sample list
"""

from . import data
from .policies import POLICIES
from .pruner import DynamicPruner, EpochSampler

__version__ = "0.1.0"

__all__ = ["POLICIES", "data", "DynamicPruner", "EpochSampler", "__version__"]
