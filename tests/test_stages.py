"""Stages as plug-ins: a stage is one file of pipelines/stages/ that declares its settings,
the keys that do not change its result and its run name; it receives its own settings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.config import register_configs
from pipelines.stage import ModelInput, Stage, stage_fields, stages

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))
HEAVY = ("pandas", "torch", "transformers", "matplotlib", "mlflow", "scipy")


def test_every_stage_is_found_and_named_after_its_module():
    found = stages()
    assert set(found) == {p.stem for p in (ROOT / "pipelines" / "stages").glob("*.py")
                          if not p.stem.startswith("_")}
    assert all(stage.name == name for name, stage in found.items())


def test_importing_every_stage_loads_no_heavy_library():
    code = ("import sys; from pipelines.config import register_configs; register_configs(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_key_two_stages_declare_differently_fails_naming_both(monkeypatch):
    @dataclasses.dataclass
    class Odd:
        batch_size: int = 9  # ModelInput says 8

    real = stages()
    odd = Stage("odd", Odd, lambda ctx, settings: None)
    monkeypatch.setattr("pipelines.stage.stages", lambda: {**real, "odd": odd})
    from pipelines.config import Config

    with pytest.raises(TypeError, match=r"stages \w+ and odd declare 'batch_size' differently"):
        stage_fields(Config)


def test_a_shared_key_declared_alike_is_one_key():
    from pipelines.config import Config

    names = [name for name, _, _ in stage_fields(Config)]
    assert len(names) == len(set(names))
    assert {f.name for f in dataclasses.fields(ModelInput)} <= set(names)


def test_the_hash_holds_the_stages_own_keys_only():
    from pipelines.run_identity import config_hash

    base = compose_cfg("stage=crossvalidate")
    same = [compose_cfg("stage=crossvalidate", extra) for extra in
            ("draws=7", "model=gpt2", "cv_jobs=2", "threads=3", "measure.windows=4")]
    assert {config_hash(c, "crossvalidate") for c in same} == {config_hash(base, "crossvalidate")}
    differs = [compose_cfg("stage=crossvalidate", extra) for extra in
               ("seeds=3", "save_predictions=true", "predictor.epochs=3", "features=model_specs")]
    assert config_hash(base, "crossvalidate") not in {config_hash(c, "crossvalidate") for c in differs}
    # the transfer stage's hash does see draws
    assert config_hash(same[0], "transfer") != config_hash(base, "transfer")


NEW_STAGE = '''
from dataclasses import dataclass

from pipelines.stage import Context, Stage


@dataclass
class HelloSettings:
    greeting: str = "hello"
    times: int = 1


def run(ctx: Context, settings: HelloSettings) -> str:
    with ctx.tracked_run({"greeting": settings.greeting}):
        text = " ".join([settings.greeting] * settings.times) + f" from {ctx.data_name}"
    (ctx.run_dir / "hello.txt").write_text(text)
    print(type(settings).__name__, text)
    return text


STAGE = Stage("hello", HelloSettings, run)
'''


def _run_with_extra_stage(folder: Path, *args: str) -> subprocess.CompletedProcess:
    (folder / "hello.py").write_text(textwrap.dedent(NEW_STAGE))
    launcher = (f"import sys, runpy; import pipelines.stages as p; p.__path__.append({str(folder)!r}); "
                f"sys.argv = ['run.py', *{list(args)!r}]; runpy.run_path('run.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", launcher], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "IRENE_OUTPUTS": str(folder / "outputs")})


def test_a_new_stage_is_one_file(tmp_path):
    """A module dropped next to the stages runs with its typed settings, its keys are settings
    of the command line, and a typo in one fails in one line."""
    out = _run_with_extra_stage(tmp_path, "stage=hello", "greeting=hi", "times=2",
                                "tracking=off", f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    assert "HelloSettings hi hi from device_1" in out.stdout
    assert (tmp_path / "run" / "hello.txt").read_text() == "hi hi from device_1"

    typo = _run_with_extra_stage(tmp_path, "stage=hello", "greting=hi", "tracking=off")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "greting" in typo.stderr and "Traceback" not in typo.stderr

    wrong_type = _run_with_extra_stage(tmp_path, "stage=hello", "times=many", "tracking=off")
    assert wrong_type.returncode == 2 and "times" in wrong_type.stderr


def test_an_unknown_stage_fails_in_one_line_listing_the_stages(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=trian", "tracking=off"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "IRENE_OUTPUTS": str(tmp_path)})
    assert out.returncode == 2
    line = out.stderr.strip()
    assert line.startswith("error: stage='trian'") and "train" in line and "\n" not in line


def test_settings_of_another_stage_are_named_as_ignored():
    from pipelines.stage import foreign_settings

    found = foreign_settings(["draws=0", "model=gpt2", "seeds=3", "predictor.epochs=1",
                              "measure.windows=4"], "crossvalidate")
    assert found == {"draws=0": ["transfer"], "model=gpt2": ["measure", "predict", "whatif"],
                     "measure.windows=4": ["measure"]}
    assert foreign_settings(["model=gpt2", "shapes=[[1,2]]"], "predict") == {}
