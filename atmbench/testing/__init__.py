"""Conformance kits: what every merge method and every refiner must do, on tiny inputs.

A plugin author runs them in their own tests; atmbench runs them over everything that is
registered. Methods (:mod:`atmbench.testing.methods`)::

    from atmbench.testing import check_method

    def test_my_method_conforms():
        check_method("my_method", hparams={"steps": 3})

Refiners (:mod:`atmbench.testing.refiners`), on a toy benchmark of two tasks::

    from atmbench.testing import check_refiner

    def test_my_refiner_conforms():
        check_refiner("my_refiner")

Both raise one :class:`ConformanceError` listing every broken rule; ``CHECKS`` /
``REFINER_CHECKS`` with :func:`run_pytest` give one pytest item per check.
"""

from atmbench.testing.methods import (
    CHECKS,
    DTYPES,
    LINEAR,
    ROWS,
    SHAPES,
    SYNTHETIC_STATISTICS,
    Check,
    ConformanceError,
    ConformanceSkip,
    Subject,
    check_method,
    fisher_like,
    gram_like,
    gram_rows_like,
    rowwise_model,
    run_pytest,
    sample_model,
    subject,
)
from atmbench.testing.refiners import (
    REFINER_CHECKS,
    RefinerSubject,
    ToyBenchmark,
    check_refiner,
    refiner_subject,
)

__all__ = [
    "CHECKS",
    "REFINER_CHECKS",
    "DTYPES",
    "LINEAR",
    "ROWS",
    "SHAPES",
    "SYNTHETIC_STATISTICS",
    "Check",
    "ConformanceError",
    "ConformanceSkip",
    "RefinerSubject",
    "Subject",
    "ToyBenchmark",
    "check_method",
    "check_refiner",
    "fisher_like",
    "gram_like",
    "gram_rows_like",
    "refiner_subject",
    "rowwise_model",
    "run_pytest",
    "sample_model",
    "subject",
]
