"""The refiner conformance kit over every registered refiner, and the kit's own teeth."""

from __future__ import annotations

import pytest
import torch

import atmbench
from atmbench.finetune import TrainStats
from atmbench.hparams import HParam
from atmbench.refiner import Refiner, RefineResult
from atmbench.testing import (
    REFINER_CHECKS,
    ConformanceError,
    check_refiner,
    refiner_subject,
    run_pytest,
)

FAST = {"atm": {"iterations": 2, "budget": 1.0}}
"""Hyperparameters that keep refiners quick on the kit's toy benchmark."""


@pytest.mark.parametrize("check", REFINER_CHECKS, ids=str)
@pytest.mark.parametrize("name", sorted(atmbench.refiners()))
def test_registered_refiner_conforms(name, check):
    run_pytest(check, refiner_subject(name, FAST.get(name)))


def _halfway(request):
    """Moves the start halfway back to θ0, in the start's dtypes."""
    start = request.base if request.from_base else request.start
    state = {
        k: ((v.float() + b.float()) / 2).to(v.dtype)
        for (k, v), b in zip(start.items(), request.base.values(), strict=True)
    }
    return RefineResult(state, {"a": TrainStats(1, 4)}, [{"iteration": 1}])


def _refiner(refine, **fields) -> Refiner:
    fields = {"data": "validation", "description": "test", **fields}
    return Refiner("kit_refiner", refine, **fields)


def test_a_conforming_refiner_passes_every_check():
    outcome = check_refiner(_refiner(_halfway, hparams=(HParam("x", default=1.0),)))
    assert outcome == {
        "registration": "passed",
        "result": "passed",
        "from_base": "skipped: the refiner declares data_from_base=None: it cannot start at θ0",
        "dtypes": "passed",
        "no_mutation": "passed",
        "deterministic": "passed",
    }
    assert check_refiner(_refiner(_halfway, data_from_base="train"))["from_base"] == "passed"


def _mutates(request):
    for v in request.start.values():
        v.mul_(2)
    return RefineResult(dict(request.start))


def _random(request):
    return RefineResult({k: v + torch.rand(v.shape).to(v.dtype) for k, v in request.start.items()})


def _float32(request):
    return RefineResult({k: v.float() for k, v in request.start.items()})


def _drops_a_key(request):
    return RefineResult(dict(list(request.start.items())[1:]))


def _bad_trace(request):
    return RefineResult(dict(request.start), trace=[{"tensor": torch.zeros(1)}])


@pytest.mark.parametrize(
    ("refine", "check", "message"),
    [
        (_mutates, "no_mutation", r"modified its input \(start\)"),
        (_random, "deterministic", "differ"),
        (_float32, "dtypes", "is torch.float32 .*, expected torch.bfloat16"),
        (_drops_a_key, "result", "keys differ"),
        (_bad_trace, "result", "not JSON-serialisable"),
        (lambda request: request.start, "result", "expected a RefineResult"),
    ],
    ids=["mutates", "random", "float32", "drops_a_key", "bad_trace", "not_a_result"],
)
def test_the_kit_catches_a_broken_refiner(refine, check, message):
    with pytest.raises(ConformanceError, match=message) as info:
        check_refiner(_refiner(refine))
    assert f"refiner 'kit_refiner', check {check}" in str(info.value)


def test_registration_rules():
    with pytest.raises(ConformanceError, match="check registration: description is empty"):
        check_refiner(_refiner(_halfway, description=""))
    repeated = (HParam("x", default=1.0), HParam("x", default=2.0))
    with pytest.raises(ConformanceError, match="hyperparameter names repeat"):
        check_refiner(_refiner(_halfway, hparams=repeated))
