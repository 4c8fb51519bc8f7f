"""The tuned configurations under ``configs/`` (the README's results table) stay configurations
that ``lrml train --config`` accepts: known options, valid values, chosen on validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrml_kernels.cli import _read_config
from lrml_kernels.data.sources import FORMS
from lrml_kernels.training import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_there_are_configurations():
    assert CONFIGS, "configs/*.json missing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configuration_is_valid_and_chosen_on_validation(path):
    values = _read_config(path)
    cfg = TrainConfig(**values)
    cfg.validate()
    assert cfg.select_on == "valid" and cfg.patience is not None
    model = path.stem.rsplit("-", 1)[1]
    assert (cfg.relation == "none") == (model == "cml"), (path.name, cfg.relation)
    kind = cfg.data.partition(":")[0]
    assert any(form.startswith(kind + ":") for form in FORMS), cfg.data
    assert cfg.data.partition(":")[2].startswith("../shared/data/")
