"""Settings that name nothing real are refused in one line, even where they would change nothing."""

from __future__ import annotations

import pytest

from irene import predictors
from irene.data.forest import build_forest
from irene.errors import SettingsError
from irene.predictors.static import predict_with_policy


@pytest.fixture(scope="module")
def fitted(small_trees):
    forest = build_forest(small_trees[:6])
    return predictors.IrenePlusPredictor(feature_sets=["model_specs"], leaf_degrees=[1]).fit(
        forest), forest


@pytest.mark.parametrize("policy", ["../../x", "NoSuchOp", "/etc/passwd"])
def test_unseen_op_that_is_no_known_primitive_is_refused_even_with_nothing_unseen(fitted, policy):
    predictor, forest = fitted  # the training forest itself: no primitive type is unseen
    with pytest.raises(SettingsError, match=r"is not a primitive type the predictor knows"):
        predict_with_policy(predictor, forest, policy)


@pytest.mark.parametrize("policy", [None, "error", "ERROR", "linear", "LayerNorm"])
def test_valid_unseen_op_policies_predict(fitted, policy):
    predictor, forest = fitted
    predicted, fallback = predict_with_policy(predictor, forest, policy)
    assert predicted.shape == (forest.num_nodes,) and not fallback.any()


# ------------------------------------------------------------------ settings of the stages
def _compose(*overrides: str):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["stage=measure", "model=tiny/gpt2", "batch_size=-8"], "batch_size=-8: "),
    (["stage=measure", "model=tiny/gpt2", "seq_len=0"], "seq_len=0: "),
    (["stage=crossvalidate", "cv_jobs=-5"], "cv_jobs=-5: must be -1 (all cores) or a number"),
    (["stage=crossvalidate", "cv_jobs=0"], "cv_jobs=0: must be -1 (all cores) or a number"),
])
def test_out_of_range_stage_settings_are_refused_for_every_stage(overrides, message):
    from pipelines.config import check_settings

    with pytest.raises(SettingsError) as error:
        check_settings(_compose(*overrides))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("jobs", ["-1", "1", "2"])
def test_valid_cv_jobs_pass(jobs):
    from pipelines.config import check_settings

    check_settings(_compose("stage=crossvalidate", f"cv_jobs={jobs}"))


@pytest.mark.parametrize(("args", "line"), [
    (["stage=measure"], "error: stage=measure needs model=<registry name or config.json path>, "
                        "e.g. model=bert-base-uncased batch_size=8 seq_len=128"),
    (["stage=measure", "model=tiny/gpt2", "batch_size=-8"], "error: batch_size=-8: "),
])
def test_cli_measure_without_a_valid_shape_is_one_line(args, line, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "run.py", "tracking=off", *args],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "IRENE_OUTPUTS": str(tmp_path)})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr[-2000:]


# ------------------------------------------------------------------ model= that is no config
@pytest.mark.parametrize(("content", "reason"), [
    ("root:x:0:0:root:/root:/bin/bash\n", "not a Hugging Face config.json: "),
    ('{"hidden_size": 8}\n', "not a Hugging Face config.json: "),
    (None, "a folder without a config.json"),
])
def test_a_model_path_that_is_no_config_is_one_line(content, reason, tmp_path):
    from irene.data.architectures import config_from_name
    from irene.errors import InputError

    path = tmp_path / "passwd" if content is not None else tmp_path / "empty"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(InputError) as error:
        config_from_name(str(path))
    message = str(error.value)
    assert message.startswith(f"model={str(path)!r}: {reason}") and "\n" not in message


def test_measuring_a_shape_too_large_to_trace_on_meta_is_still_refused(monkeypatch):
    """A value branch too large for the meta trace leaves no estimate: the hidden states'
    bytes are then the bound, and 64k x 1024 tokens of gpt2 do not fit in 1 GiB."""
    from irene.data import architectures
    from irene.measure import trace

    model = architectures.model_from_name("tiny/gpt2", "eager", device="cpu")
    monkeypatch.setattr(architectures, "device_free_bytes", lambda device: 2**30)
    assert trace.estimate_activation_bytes(model, 65536, 1024, capture_inputs=True) is None
    with pytest.raises(SettingsError, match=r"tiny/gpt2 65536x1024: its activations need about"):
        trace.check_activations_fit(model, 65536, 1024, "tiny/gpt2", capture_inputs=True)
