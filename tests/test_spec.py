from __future__ import annotations

import pytest

from atmbench import registry
from atmbench.hparams import HParam, HParamError, grid
from atmbench.spec import SpecError, parse_spec, split_specs


def test_split_keeps_hyperparameters_with_their_spec():
    assert split_specs("ta:lam=0.3,ties:k=0.2,lam=0.5, average") == [
        "ta:lam=0.3",
        "ties:k=0.2,lam=0.5",
        "average",
    ]


def test_parse_checks_and_converts_values():
    spec = parse_spec("ta:lam=0.25", registry.methods(), registry.refiners())
    assert spec.method.name == "ta" and spec.method.fixed == {"lam": 0.25}
    assert spec.label == "ta:lam=0.25" and spec.refiners == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ta:lam", "malformed hyperparameter 'lam'"),
        ("ta+", "empty method spec"),
        ("ta+nope", "unknown refiner 'nope'"),
        ("ta:lam=x", "lam=x is invalid"),
        ("ta:lam=nan", "lam=nan is invalid"),
    ],
)
def test_bad_specs(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text, registry.methods(), registry.refiners())


def test_hparam_ranges_and_grid():
    k = HParam("k", 0.2, search=(0.1, 0.2), low=0.0, high=1.0, open_low=True)
    with pytest.raises(HParamError, match=r"k=1.7 is invalid: expected a float in \(0.0, 1.0\]"):
        k.check(1.7)
    with pytest.raises(HParamError):
        k.check(0.0)
    mode = HParam("mode", "sum", choices=("sum", "mean"), type=str)
    assert grid([k, mode], {"mode": "mean"}) == [
        {"k": 0.1, "mode": "mean"},
        {"k": 0.2, "mode": "mean"},
    ]
