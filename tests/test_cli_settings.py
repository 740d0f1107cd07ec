"""Settings that do not exist fail at start-up in one line, through Hydra's public API only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import run
from irene.errors import SettingsError
from pipelines.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("experiment", [None] + sorted(p.stem for p in
                                                       (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_has_only_known_settings(experiment):
    cfg = _compose([f"experiment={experiment}"] if experiment else [])
    assert run.unknown_settings(cfg) == []


@pytest.mark.parametrize(("override", "unknown", "hint"), [
    ("+predicter=irene", "predicter", "did you mean predictor?"),
    ("+data.pathh=x", "data.pathh", "did you mean data.path?"),
    ("+predictor.epoch=3", "predictor.epoch", "did you mean predictor.epochs?"),
    ("+tracking.bogus=2", "tracking.bogus", None),
])
def test_an_added_key_the_schema_lacks_is_refused(override, unknown, hint):
    cfg = _compose([override])
    assert run.unknown_settings(cfg) == [unknown]
    with pytest.raises(SettingsError) as error:
        run.check_known_settings(cfg)
    assert str(error.value).startswith(f"{unknown}: no such setting or config group")
    assert (hint in str(error.value)) if hint else "did you mean" not in str(error.value)


@pytest.mark.parametrize(("setting", "message"), [
    ("+predicter=irene", "error: predicter: no such setting or config group; did you mean predictor?"),
    ("predictor.lr=abc", "error: Error merging override predictor.lr=abc: Value 'abc' of type "
                         "'str' could not be converted to Float"),
])
def test_cli_unknown_or_unusable_setting_is_one_line_and_exit_2(setting, message, tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=evaluate", "tracking=off", setting],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "IRENE_OUTPUTS": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [message]


def test_cli_hydra_full_error_keeps_hydras_exception(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "IRENE_OUTPUTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "run.py", "stage=evaluate", "tracking=off",
                          "data.pth=x"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ConfigCompositionException" in out.stderr


def test_run_py_reaches_into_no_private_hydra_module():
    source = (ROOT / "run.py").read_text()
    assert "_internal" not in source
