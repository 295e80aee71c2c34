"""atmbench: a benchmark for model merging, with ATM (Alternating Tuning and Merging).

The Python API is what the command line uses::

    import atmbench
    merged = atmbench.merge("ta:lam=0.3", base_state, {"mnist": expert_state, ...})
"""

from atmbench.api import merge, merge_per_task
from atmbench.registry import methods, refiners, suites

__all__ = ["merge", "merge_per_task", "methods", "refiners", "suites"]
