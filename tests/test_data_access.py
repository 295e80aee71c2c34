"""Every registered method and refiner says what data it touches: the fairness column."""

from __future__ import annotations

import atmbench
from atmbench.method import DATA_ACCESS


def test_every_registered_method_and_refiner_declares_data_access():
    assert atmbench.methods(), "no methods registered"
    for name, method in atmbench.methods().items():
        assert method.data in DATA_ACCESS, name
    for name, refiner in atmbench.refiners().items():
        assert refiner.data in DATA_ACCESS, name
        assert refiner.data_from_base in (*DATA_ACCESS, None), name


def test_cells_record_data_access_and_compute(use_shared_home):
    from click.testing import CliRunner

    from atmbench.cli import cli
    from atmbench.store import ResultStore

    result = CliRunner().invoke(
        cli, ["run", "--model", "vit-micro", "--quiet", "--methods", "ta,ta:lam=0.3"]
    )
    assert result.exit_code == 0, result.output
    cells = ResultStore(use_shared_home / "results.sqlite").cells().set_index("method")
    experts_steps = cells.at["experts", "steps"]
    assert experts_steps > 0
    assert cells.at["pretrained", "data_access"] == "none" and cells.at["pretrained", "steps"] == 0
    assert cells.at["experts", "data_access"] == "train"
    assert cells.at["mtl", "data_access"] == "train" and cells.at["mtl", "steps"] == experts_steps
    # λ searched on validation makes TA a validation-data cell; a fixed λ keeps it data-free
    assert cells.at["ta", "data_access"] == "validation"
    assert cells.at["ta:lam=0.3", "data_access"] == "none"
    assert cells.at["ta", "steps"] == experts_steps  # the experts' compute is the method's
    assert cells.at["ta", "merge_time_s"] > 0
