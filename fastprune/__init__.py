"""fastprune: train each epoch only on the samples that still teach the model something.

    pruner = fastprune.DynamicPruner(num_samples=len(ds), num_classes=1000, epochs=90)
    loss = pruner.step(logits, labels, indices)   # fused loss + gradient + score update
    order = pruner.next_epoch()                   # the next epoch's shuffled sample list
"""

__version__ = "0.1.0"  # before the imports: submodules read it

from ._source_tree import install as _install_source_tree  # noqa: E402

_install_source_tree()  # a checkout on PYTHONPATH imports fastprune.kernels as an install does

from . import data, static
from .embeddings import Embeddings
from .policies import POLICIES
from .pruner import DynamicPruner, EpochSampler

__all__ = ["POLICIES", "Embeddings", "data", "static", "DynamicPruner", "EpochSampler", "__version__"]
