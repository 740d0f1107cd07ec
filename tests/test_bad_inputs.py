"""A corpus of bad inputs: every one ends in exactly one ``error: ...`` line and exit code 2,
and leaves the inputs, the outputs and the MLflow store as they were.

Each case composes the real config, runs the stage in this process through ``run.execute``
(the function ``python run.py`` calls) and checks the exact line; the table ``CASES`` is the
documentation of what each bad input gets (docs/trust.md). Inputs are derived in ``tmp_path``
from the published device-1 CSVs, cut to one cell per model so that every case takes
seconds; nothing is downloaded (the network is replaced by a refusal).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

import run as cli
from irene.data import locate, published
from irene.data.architectures import MODEL_REGISTRY
from irene.data.published import CSV_FILES, csv_name, import_device
from irene.data.tree import iter_nodes, write_trees
from pipelines.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CELL = ("8.0", "32.0")  # the (batch_size, seq_len) kept of every model
FILES = ", ".join(csv_name(level) for level in CSV_FILES)
register_configs()


# ----------------------------------------------------------------------------- inputs
def small_device(source: Path, target: Path) -> Path:
    """The device's rows of one cell per model, bytes of every kept line unchanged."""
    target.mkdir(parents=True, exist_ok=True)
    for level in CSV_FILES:
        lines = (source / csv_name(level)).read_text().splitlines(keepends=True)
        kept = [lines[0]] + [line for line in lines[1:] if tuple(line.split(",")[:2]) == CELL]
        (target / csv_name(level)).write_text("".join(kept))
    return target


def edit_cell(folder: Path, level: str, row: int, column: str, value: str) -> None:
    """Set ``column`` of data row ``row`` (0: the file's line 2) of a CSV."""
    path = folder / csv_name(level)
    rows = list(csv.reader(path.read_text().splitlines()))
    rows[row + 1][rows[0].index(column)] = value
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def duplicate_line(folder: Path, level: str, row: int) -> None:
    path = folder / csv_name(level)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + [lines[row + 1]]))


def line_of(folder: Path, level: str, text: str) -> int:
    """The line number of the first line containing ``text``."""
    lines = (folder / csv_name(level)).read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if text in line)


def hashes(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not skip(p)}


def store_runs(uri: str) -> dict[str, tuple]:
    client = mlflow.MlflowClient(uri)
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=5000):
            found[run.info.run_id] = (run.info.status, dict(run.data.params),
                                      dict(run.data.metrics), run.info.end_time)
    return found


# ------------------------------------------------------------------------------ sandbox
@pytest.fixture(scope="module")
def world(device_dir, tmp_path_factory):
    """Module-wide: a small device, its trees, a trained static predictor, an outputs folder
    with a FINISHED run in its MLflow store; no network."""
    base = tmp_path_factory.mktemp("corpus")
    device = small_device(device_dir, base / "inputs" / "device_1")
    trees = write_trees(base / "inputs" / "trees.jsonl", import_device(device))
    outputs = base / "outputs"
    mp = pytest.MonkeyPatch()
    mp.setenv("IRENE_OUTPUTS", str(outputs))
    mp.delenv("IRENE_DATA_DIR", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)

    def offline(url, timeout):
        raise OSError("network disabled in the tests")

    mp.setattr(locate.urllib.request, "urlopen", offline)
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    from pipelines.stage import run_stage

    run_stage("featurize", _compose("stage=featurize", f"data.path={device}", f"tracking.uri={uri}",
                           "tracking.experiment=corpus", f"run_dir={outputs / 'featurized'}"))
    model_dir = run_stage("train", _compose("stage=train", f"data.trees={trees}", "tracking=off",
                                   "features=model_specs", "predictor.epochs=1",
                                   f"model_dir={base / 'inputs' / 'model'}",
                                   f"run_dir={base / 'train'}", "show_progress=false"))
    assert store_runs(uri) and all(r[0] == "FINISHED" for r in store_runs(uri).values())
    yield {"base": base, "device": device, "trees": trees, "outputs": outputs, "uri": uri,
           "model_dir": model_dir}
    mp.undo()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@dataclass
class Case:
    """A bad input: Hydra overrides, the files it needs, and the exact line it must give."""

    id: str
    overrides: list[str]
    message: str  # after "error: "; {dev}, {trees}, {model_dir}, {tmp}, {line} are filled in
    prepare: Callable[[dict], dict | None] | None = None  # derives inputs; may add fields
    tracked: bool = True  # run with the MLflow store (False: tracking=off)
    extra: dict = field(default_factory=dict)


def _dev(ctx: dict) -> Path:
    """A fresh copy of the small device for this case (``{dev}``)."""
    folder = ctx["tmp"] / "dev"
    shutil.copytree(ctx["world"]["device"], folder)
    ctx["dev"] = folder
    return folder


def _with_dev(*edits: Callable[[Path], object], line: tuple[str, str] | None = None):
    """A copy of the small device with ``edits``; ``line``: (level, text) whose first line
    number is ``{line}`` (text ``None``: the file's last line)."""
    def prepare(ctx: dict) -> dict:
        folder = _dev(ctx)
        for edit in edits:
            edit(folder)
        if line is None:
            return {}
        level, text = line
        if text is None:
            return {"line": len((folder / csv_name(level)).read_text().splitlines())}
        return {"line": line_of(folder, level, text)}
    return prepare


def _trees_with(mutate: Callable[[list], object]):
    def prepare(ctx: dict) -> dict:
        trees = [json.loads(line) for line in ctx["world"]["trees"].read_text().splitlines()]
        mutate(trees)
        path = ctx["tmp"] / "bad.jsonl"
        path.write_text("".join(json.dumps(t) + "\n" for t in trees))
        return {"trees": path}
    return prepare


def _bytes_file(name: str, data: bytes):
    def prepare(ctx: dict) -> dict:
        path = ctx["tmp"] / name
        path.write_bytes(data)
        return {"trees": path}
    return prepare


def _node(trees: list, model: str, scope: str) -> dict:
    tree = next(t for t in trees if t["model_name"] == model)
    return next(n for n in iter_nodes(tree["frontend_tree"]) if n["scope"] == scope)


def _rename_model(folder: Path, old: str, new: str) -> None:
    for level in CSV_FILES:
        path = folder / csv_name(level)
        path.write_text(path.read_text().replace(f",{old}\n", f",{new}\n"))


KNOWN_MODELS = ", ".join(sorted(MODEL_REGISTRY))
STRATEGIES = "['end2end', 'stepwise', 'unstructured', 'none']"
ROW2 = "model_level_features.csv:2"  # bert-base-uncased's model row
DEV = "data.path={dev}"
FEAT = "stage=featurize"
CV = "stage=crossvalidate"
UNSEEN_HELP = ("unseen_op: null (the predictor's own policy), 'error', or a known primitive "
               "type whose regressor is used instead")

CASES = [
    # --------------------------------------------------------------- where the data are
    Case("folder-missing-a-csv", [FEAT, DEV],
         f"data.path={{dev}}: ml2_level_features.csv is missing (a device folder holds {FILES})",
         _with_dev(lambda d: (d / csv_name("ml2")).unlink())),
    Case("data-path-not-a-folder", [FEAT, "data.path={tmp}/nowhere"],
         "data.path={tmp}/nowhere: no such folder"),
    Case("device_2-never-reads-device_1", [FEAT, "data=device_2"],
         "published data for device_2 not found. Looked in: $IRENE_DATA_DIR={env} skipped: it "
         "is the folder of device_1; project datasets folder: {datasets}/device_2; download: "
         "could not download https://raw.githubusercontent.com/StonyBrookNLP/irene/original/"
         "datasets/device_2/model_level_features.csv: network disabled in the tests. Provide a "
         f"folder with {FILES} via data.path=..., or $IRENE_DATA_DIR=<folder holding device_2/>,"
         " or put them in {datasets}/device_2 (public URLs and sha256 in "
         f"{published.SOURCES_FILE}).",
         lambda ctx: {"env": ctx["world"]["device"],
                      "datasets": ctx["world"]["outputs"].parent / "datasets"},
         extra={"env": True}),
    Case("env-folder-of-the-device-missing-a-csv", [FEAT],
         f"$IRENE_DATA_DIR={{dev}}: model_level_features.csv is missing (a device folder "
         f"holds {FILES})",
         lambda ctx: _rename_to_device_1(ctx), extra={"env": True}),
    Case("data-models-absent-from-trees", [FEAT, "data.trees={trees}", "data.models=[gpt3]"],
         "data.models: ['gpt3'] not in {trees}; it has ['bert-base-uncased', "
         "'distilbert-base-uncased', 'roberta-base', 'gpt2', 'distilgpt2', 'openai-gpt'] "
         "(data.models=null keeps every model of the file)"),
    Case("trees-file-missing", [FEAT, "data.trees={tmp}/none.jsonl"],
         "trees file not found: {tmp}/none.jsonl"),
    # ------------------------------------------------------------------- CSV values
    Case("batch-size-8.7", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'batch_size': must be a positive integer, got 8.7",
         _with_dev(lambda d: edit_cell(d, "model", 0, "batch_size", "8.7"))),
    Case("batch-size-0", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'batch_size': must be a positive integer, got 0",
         _with_dev(lambda d: edit_cell(d, "model", 0, "batch_size", "0"))),
    Case("batch-size-minus-8", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'batch_size': must be a positive integer, got -8",
         _with_dev(lambda d: edit_cell(d, "model", 0, "batch_size", "-8"))),
    Case("seq-len-not-a-number", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'seq_len': must be a finite number, got 'abc'",
         _with_dev(lambda d: edit_cell(d, "model", 0, "seq_len", "abc"))),
    Case("seq-len-empty", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'seq_len': must be a finite number, got an empty cell (or NaN)",
         _with_dev(lambda d: edit_cell(d, "model", 0, "seq_len", ""))),
    Case("negative-flops", [FEAT, DEV],
         "{dev}/ml1_level_features.csv:3: field 'flops': must be in [0, 1e+15] MFLOP, got -1.5",
         _with_dev(lambda d: edit_cell(d, "ml1", 1, "flops", "-1.5"))),
    Case("energy-1e308", [FEAT, DEV],
         "{dev}/module_level_features.csv:2: field 'energy_mean': must be in [0, 1e+09] J, "
         "got 1e+308",
         _with_dev(lambda d: edit_cell(d, "module", 0, "energy_mean", "1e308"))),
    Case("energy-zero", [FEAT, DEV],
         "{dev}/ml2_level_features.csv:4: field 'energy_mean': must be a finite positive "
         "number, got 0",
         _with_dev(lambda d: edit_cell(d, "ml2", 2, "energy_mean", "0"))),
    Case("energy-infinite", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'energy_mean': must be a finite positive number, got inf",
         _with_dev(lambda d: edit_cell(d, "model", 0, "energy_mean", "inf"))),
    Case("gpu-utilisation-150", [FEAT, DEV],
         f"{{dev}}/{ROW2}: field 'gpu': must be in [0, 100] %, got 150",
         _with_dev(lambda d: edit_cell(d, "model", 0, "gpu", "150"))),
    Case("negative-time", [FEAT, DEV],
         "{dev}/ml1_level_features.csv:2: field 'times_mean': must be in [0, 1e+06] s, got -0.01",
         _with_dev(lambda d: edit_cell(d, "ml1", 0, "times_mean", "-0.01"))),
    Case("column-missing", [FEAT, DEV],
         "{dev}/ml2_level_features.csv:1: field 'gpu_energy_mean': column missing",
         _with_dev(lambda d: (d / csv_name("ml2")).write_text(
             (d / csv_name("ml2")).read_text().replace("gpu_energy_mean", "gpu_energy", 1)))),
    Case("empty-csv", [FEAT, DEV],
         "{dev}/module_level_features.csv:1: empty file; expected the header "
         + ",".join(published.CSV_COLUMNS),
         _with_dev(lambda d: (d / csv_name("module")).write_text(""))),
    Case("binary-csv", [FEAT, DEV],
         "{dev}/model_level_features.csv: not UTF-8 text (byte 1); is this a CSV file?",
         _with_dev(lambda d: (d / csv_name("model")).write_bytes(b"\xff\xfe\x00\x01\x80" * 64))),
    Case("level-name-without-colon", [FEAT, DEV],
         "{dev}/module_level_features.csv:{line}: field 'level_name': expected "
         "'<module scope>:<class name>', got 'embeddings'",
         _with_dev(lambda d: (d / csv_name("module")).write_text(
             (d / csv_name("module")).read_text().replace("embeddings:BertEmbeddings",
                                                          "embeddings", 1)),
                   line=("module", ",embeddings,"))),
    Case("scope-with-no-module", [FEAT, DEV],
         "{dev}/module_level_features.csv:{line}: field 'level_name': scope "
         "'encoder.nowhere' is not a module of bert-base-uncased in this transformers version",
         _with_dev(lambda d: (d / csv_name("module")).write_text(
             (d / csv_name("module")).read_text().replace("embeddings:BertEmbeddings",
                                                          "encoder.nowhere:BertEmbeddings", 1)),
                   line=("module", "encoder.nowhere:"))),
    Case("model-not-in-the-registry",
         [FEAT, DEV, "data.models=[my-model,gpt2]"],
         f"{{dev}}/{ROW2}: field 'model_name': 'my-model' is not an architecture this "
         f"version knows (irene/data/architectures.py); known: {KNOWN_MODELS}",
         _with_dev(lambda d: _rename_model(d, "bert-base-uncased", "my-model"))),
    Case("two-model-rows-for-one-shape", [FEAT, DEV],
         "{dev}/model_level_features.csv:{line}: field 'level_name': a second row for "
         "bert-base-uncased (8, 32) (the first is line 2)",
         _with_dev(lambda d: duplicate_line(d, "model", 0), line=("model", None))),
    Case("two-module-rows-for-one-scope", [FEAT, DEV],
         "{dev}/module_level_features.csv:{line}: field 'level_name': a second row for scope "
         "'embeddings' of bert-base-uncased (8, 32) (the first is module_level_features.csv:2)",
         _with_dev(lambda d: duplicate_line(d, "module", 0), line=("module", None))),
    # ------------------------------------------------------------------ trees files
    Case("binary-trees", [FEAT, "data.trees={trees}"],
         "{trees}:1: not UTF-8 text (byte 1); is this a trees jsonl file?",
         _bytes_file("garbage.jsonl", b"\x89PNG\r\n\x1a\n\xff\x00" * 50)),
    Case("truncated-trees", [FEAT, "data.trees={trees}"],
         "{trees}:1: invalid JSON (Unterminated string starting at character 24); "
         "is the file truncated?",
         _bytes_file("cut.jsonl", b'{"model_name": "gpt2", "batch')),
    Case("node-without-flops", [CV, "data.trees={trees}", "features=model_specs"],
         "node 'gpt2/8x32/root.h.0.attn.c_attn' lacks feature 'flops' (the selected feature "
         "sets read it; features=model_specs reads only static ones)",
         _trees_with(lambda t: _node(t, "gpt2", "root.h.0.attn.c_attn").pop("flops"))),
    Case("negative-flops-in-trees", [FEAT, "data.trees={trees}"],
         "{trees}:1: node 'root.encoder': field 'flops': must be in [0, 1e+15] MFLOP, got -1.0",
         _trees_with(lambda t: _node(t, "bert-base-uncased", "root.encoder")
                     .__setitem__("flops", -1.0))),
    Case("ground-truth-1e308", [FEAT, "data.trees={trees}"],
         "{trees}:2: node 'root.transformer': field 'ground_truth_energy': must be in "
         "[0, 1e+09] J, got 1e+308",
         _trees_with(lambda t: _node(t, "distilbert-base-uncased", "root.transformer")
                     .__setitem__("ground_truth_energy", 1e308))),
    Case("batch-size-minus-8-in-trees", [FEAT, "data.trees={trees}"],
         "{trees}:4: field 'batch_size': must be a positive integer, got -8",
         _trees_with(lambda t: t[3].__setitem__("batch_size", -8))),
    Case("two-trees-for-one-shape", [FEAT, "data.trees={trees}"],
         "{trees}:7: field 'model_name': a second tree for ('bert-base-uncased', 8, 32) "
         "(the first is on line 1)",
         _trees_with(lambda t: t.append(t[0]))),
    # ------------------------------------------------------------------- settings
    Case("epochs-minus-1", [CV, DEV, "predictor.epochs=-1"],
         "predictor.epochs=-1: must be in [1, 100000]"),
    Case("epochs-0", [CV, DEV, "predictor.epochs=0"], "predictor.epochs=0: must be in [1, 100000]"),
    Case("lr-0", [CV, DEV, "predictor.lr=0"], "predictor.lr=0.0: must be in (0, 1]"),
    Case("lr-minus-1", [CV, DEV, "predictor.lr=-1"], "predictor.lr=-1.0: must be in (0, 1]"),
    Case("lr-1e308", [CV, DEV, "predictor.lr=1e308"], "predictor.lr=1e+308: must be in (0, 1]"),
    Case("tau-0", [CV, DEV, "predictor.tanh_scalar=0"],
         "predictor.tanh_scalar=0.0: must be in (0, inf]"),
    Case("polynomial-degree-20", [CV, DEV, "predictor.polynomial_degree=20"],
         "predictor.polynomial_degree=20: must be in [0, 10]"),
    Case("polynomial-degree-5-too-many-inputs", [CV, DEV, "predictor.polynomial_degree=5"],
         "predictor.polynomial_degree=5: gives 11628 weighting inputs for 14 features, more "
         "than 2000; use a smaller degree"),
    Case("seed-negative", [CV, DEV, "predictor.seed=-1"],
         "predictor.seed=-1: must be in [0, 4294967295]"),
    Case("irene-plus-alpha-1e308", [CV, DEV, "predictor=irene_plus", "predictor.leaf_alphas=[1e308]"],
         "predictor.leaf_alphas=[1e+308]: item 1e+308 must be in [0, 1e+06]"),
    Case("strategy-bogus", [CV, DEV, "strategy.name=bogus"],
         f"strategy.name='bogus': choose from {STRATEGIES}"),
    Case("strategy-bogus-with-irene-plus", [CV, DEV, "predictor=irene_plus", "strategy.name=bogus"],
         f"strategy.name='bogus': choose from {STRATEGIES}"),
    Case("weighting-bogus", [CV, DEV, "weighting.name=bogus"],
         "weighting.name='bogus': choose from ['exact_one', 'close_to_one', 'free', 'paper']"),
    Case("feature-sets-empty", [CV, DEV, "features.sets=[]"],
         "features.sets=[]: must be a non-empty list"),
    Case("feature-sets-unknown", [CV, DEV, "features.sets=[model_spec]"],
         "features.sets=['model_spec']: item 'model_spec' choose from ['model_specs', "
         "'resource_utilization']"),
    Case("single-model-leave-one-out", [CV, DEV, "data.models=[gpt2]"],
         "leave-one-model-out needs at least two models, got ['gpt2'] (data.models=null or a "
         "list of two or more)"),
    Case("data-models-empty", [CV, DEV, "data.models=[]"],
         "data.models=[]: must be a non-empty list of model names, or null"),
    Case("device-name-escapes-the-tables-folder", [FEAT, "data.name=../../etc", DEV],
         "data.name='../../etc': must be a folder name (letters, digits, '_', '.', '+', '-')"),
    Case("threads-negative", [FEAT, DEV, "threads=-1"], "threads=-1: must be in [0, 4096]"),
    Case("stage-bogus", ["stage=bogus"],
         "stage='bogus': choose from ['crossvalidate', 'diagnose', 'evaluate', 'featurize', "
         "'measure', 'plan', 'predict', 'report', 'train', 'transfer', 'whatif']"),
    Case("physics-on-static-features", [CV, DEV, "predictor=physics", "features=model_specs"],
         "predictor 'physics' needs the features ['gpu_energy_mean', 'times_mean'], which the "
         "selected feature sets ['model_specs'] do not provide (they give ['num_parameters', "
         "'input_size', 'batch_size', 'seq_len', 'flops', 'mem_bytes']); choose features=both "
         "or features=resource_utilization, or another predictor"),
    # ------------------------------------------------------------- predict, report
    Case("predict-without-a-model", ["stage=predict"],
         "stage=predict needs a trained predictor: model_dir=<folder written by stage=train> "
         "or model_run=<MLflow run id of stage=train> (or model=<name> to trace a model and use "
         "the default static predictor)"),
    Case("predict-model-dir-empty", ["stage=predict", "model=tiny/bert", "model_dir={tmp}"],
         "{tmp}/predictor.json: no saved predictor there (stage=train writes one)"),
    Case("predict-model-file-garbage", ["stage=predict", "model=tiny/bert", "model_dir={tmp}"],
         "{tmp}/predictor.json: not a predictor.json (UnicodeDecodeError: 'utf-8' codec can't "
         "decode byte 0xff in position 0: invalid start byte)",
         lambda ctx: {"bytes": (ctx["tmp"] / "predictor.json").write_bytes(b"\xff\xd8" * 9)}),
    Case("predict-model-not-in-the-registry",
         ["stage=predict", "model=not-a-model", "model_dir={model_dir}"],
         f"model='not-a-model': unknown model; use one of {KNOWN_MODELS} or a config.json path"),
    Case("predict-model-config-json-missing",
         ["stage=predict", "model={tmp}/config.json", "model_dir={model_dir}"],
         "model='{tmp}/config.json': no such file or folder (a Hugging Face config.json, or a "
         "folder holding one, is read from disk)"),
    Case("predict-seq-len-beyond-positions",
         ["stage=predict", "model=tiny/bert", "seq_len=100", "model_dir={model_dir}"],
         "seq_len=100: tiny/bert takes at most 64 tokens (its position embeddings)"),
    Case("predict-batch-size-0", ["stage=predict", "model=tiny/bert", "batch_size=0",
                                  "model_dir={model_dir}"],
         "batch_size=0: must be in [1, 65536]"),
    Case("predict-shapes-not-pairs", ["stage=predict", "model=tiny/bert", "shapes=[[8]]",
                                      "model_dir={model_dir}"],
         "shapes=[[8]]: every entry is [batch_size, seq_len], got [8]"),
    Case("predict-unseen-op-error",
         ["stage=predict", "trees={trees}", "unseen_op=error", "model_dir={model_dir}"],
         "primitive types ['fancynorm'] (e.g. node 'gpt2/8x32/root.ln_f') were never seen in "
         f"training (known: {{known}}); {UNSEEN_HELP}",
         lambda ctx: {**_trees_with(lambda t: _node(t, "gpt2", "root.ln_f")
                                    .__setitem__("instance_type", "FancyNorm"))(ctx),
                      "known": sorted(json.loads((ctx["world"]["model_dir"] / "predictor.json")
                                                 .read_text())["state"]["leaf_regressors"])}),
    Case("predict-unseen-op-unknown-target",
         ["stage=predict", "trees={trees}", "unseen_op=batchnorm", "model_dir={model_dir}"],
         "unseen_op='batchnorm' is not a primitive type the predictor knows ({known}); "
         f"{UNSEEN_HELP}",
         lambda ctx: {**_trees_with(lambda t: _node(t, "gpt2", "root.ln_f")
                                    .__setitem__("instance_type", "FancyNorm"))(ctx),
                      "known": sorted(json.loads((ctx["world"]["model_dir"] / "predictor.json")
                                                 .read_text())["state"]["leaf_regressors"])}),
    Case("evaluate-without-predictions", ["stage=evaluate"],
         "stage=evaluate needs predictions=<predicted trees jsonl>"),
    Case("report-before-its-sweep", ["stage=report", "experiment=per_model"],
         "no FINISHED crossvalidate run of preset 'per_model' on device_1: run its sweep first "
         "(python run.py -m experiment=per_model)"),
    Case("report-runs-before-its-sweep", ["stage=report", "experiment=predictors"],
         "no FINISHED crossvalidate runs found for this preset and data set"),
    Case("report-without-tracking", ["stage=report", "experiment=per_model"],
         "stage=report reads MLflow runs: tracking must be enabled", tracked=False),
    Case("whatif-without-models", ["stage=whatif", "model_dir={model_dir}"],
         "stage=whatif needs models=[name,...] (or model=<name>)"),
]


def _rename_to_device_1(ctx: dict) -> dict:
    """$IRENE_DATA_DIR names device_1 (the folder's name) but lacks a file: an error, not a
    fall-back to another location."""
    folder = ctx["tmp"] / "irene" / "device_1"
    shutil.copytree(ctx["world"]["device"], folder)
    (folder / csv_name("model")).unlink()
    ctx["dev"] = folder
    return {"env": folder}


def _ids(cases):
    return [c.id for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(case, world, tmp_path, monkeypatch, capsys):
    ctx = {"tmp": tmp_path, "world": world}
    fields = {"tmp": tmp_path, "trees": world["trees"], "model_dir": world["model_dir"]}
    if case.prepare:
        fields.update(case.prepare(ctx) or {})
    fields.setdefault("dev", ctx.get("dev", world["device"]))
    if case.extra.get("env"):
        monkeypatch.setenv("IRENE_DATA_DIR", str(fields["env"]))
    overrides = [o.format(**fields) for o in case.overrides]
    tracking = ([f"tracking.uri={world['uri']}", "tracking.experiment=corpus"] if case.tracked
                else ["tracking=off"])
    run_dir = tmp_path / "run"
    cfg = _compose(*overrides, *tracking, f"run_dir={run_dir}", "show_progress=false")

    inputs = {p: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in [*tmp_path.rglob("*"), *world["base"].joinpath("inputs").rglob("*")]
              if p.is_file()}
    not_outputs = {"mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db.lock"}
    outputs_before = hashes(world["outputs"], lambda p: p.name in not_outputs
                            or "mlartifacts" in p.parts)
    runs_before = store_runs(world["uri"])
    capsys.readouterr()

    with pytest.raises(SystemExit) as stop:
        cli.execute(cfg)

    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert lines[-1] == "error: " + case.message.format(**fields)
    assert "Traceback" not in err
    # inputs, outputs, store
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == inputs
    outputs_after = hashes(world["outputs"], lambda p: p.name in not_outputs
                           or "mlartifacts" in p.parts)
    assert {k: v for k, v in outputs_after.items() if k in outputs_before} == outputs_before
    # new files: only the import cache of valid CSVs (content-addressed by their sha256)
    assert all(k.startswith("cache/") for k in set(outputs_after) - set(outputs_before))
    assert not run_dir.exists() or not [p for p in run_dir.rglob("*") if p.is_file()]
    assert not list((world["outputs"].parent / "datasets").glob("*/*"))  # no partial download
    runs_after = store_runs(world["uri"])
    assert {k: v for k, v in runs_after.items() if k in runs_before} == runs_before
    assert {v[0] for k, v in runs_after.items() if k not in runs_before} <= {"FAILED"}


def test_the_corpus_has_every_case_of_the_issue():
    assert len(CASES) >= 40 and len(set(_ids(CASES))) == len(CASES)


def test_the_sandbox_itself_runs_clean(world, tmp_path, capsys):
    """The same set-up with good inputs finishes: the cases fail for their stated reason."""
    cfg = _compose(FEAT, f"data.path={world['device']}", f"tracking.uri={world['uri']}",
                   "tracking.experiment=corpus", f"run_dir={tmp_path / 'run'}")
    cli.execute(cfg)
    assert "error:" not in capsys.readouterr().err
    assert (tmp_path / "run" / "trees.jsonl").is_file()
