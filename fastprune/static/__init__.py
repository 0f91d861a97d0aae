"""Static pruning: choose a subset once, before training (or as the dynamic pruner's first pass).

- ``influence_prune`` / ``influence_scores``: influence-function dataset pruning (Yang et al., ICLR 2023)
  on a linear softmax head over fixed features.
- ``el2n_scores``, ``forgetting_scores``, ``random_subset``: the standard baselines.
"""

from .baselines import el2n_scores, forgetting_scores, random_subset
from .influence import LinearHead, fit_head, influence_prune, influence_scores
from .subset import load_subset, save_subset

__all__ = ["LinearHead", "el2n_scores", "fit_head", "forgetting_scores", "influence_prune", "influence_scores",
           "load_subset", "random_subset", "save_subset"]
