"""Dataclass schemas of the Hydra config, registered in the ConfigStore.

``conf/config.yaml`` puts ``schema`` first in its defaults list, so every option file and every
command-line override is checked against these types: a typo in a key fails at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any  # noqa: UP035 - OmegaConf needs typing.Optional

from hydra.core.config_store import ConfigStore

from irene.measure.settings import MeterSettings, ProtocolSettings, SettingsError
from irene.published import PAPER_MODELS


@dataclass
class DataConfig:
    name: str = "device_1"  # device name; also the download source in datasets/published.json
    path: str | None = None  # folder of the four CSVs (default: $IRENE_DATA_DIR, datasets/<name>)
    trees: str | None = None  # a trees jsonl to use instead of the CSVs
    models: list[str] | None = field(default_factory=lambda: list(PAPER_MODELS))  # None: all
    download: bool = True  # fetch the CSVs from the public repository when not found


@dataclass
class FeaturesConfig:
    name: str = "both"  # option name, logged as a param
    sets: list[str] = field(default_factory=lambda: ["model_specs", "resource_utilization"])


@dataclass
class StrategyConfig:
    name: str = "end2end"  # end2end | stepwise | unstructured | none (see irene/model.py)


@dataclass
class WeightingConfig:
    name: str = "close_to_one"  # exact_one | close_to_one | free


@dataclass
class PredictorConfig:
    name: str = "irene"
    standardize_features: bool = True  # z-score features before the polynomial expansion
    polynomial_degree: int = 3  # degree of feature interactions of the weighting model (<=1: off)
    tanh_scalar: float = 10.0  # τ of w = 1 + tanh(θ·x)/τ
    normalize_loss_scale: bool = True  # divide each node's squared error by gold²
    epochs: int = 8  # passes over the training trees
    lr: float = 1e-3  # Adam learning rate
    seed: int = 13370  # torch seed of the weighting model's initialisation
    engine: str = "numpy"  # numpy (hand-written gradients, fast) | torch (autograd)
    unseen_op: str = "error"  # primitive type never seen in training: error | <known type>
    options: dict[str, Any] = field(default_factory=dict)  # the predictor's own settings


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    uri: str | None = None  # default: sqlite:///<project>/outputs/mlflow.db ($MLFLOW_TRACKING_URI wins)
    experiment: str = "irene"  # MLflow experiment name
    artifact_root: str | None = None  # default: <project>/outputs/mlartifacts


@dataclass
class ExplainConfig:
    top_n: int = 10  # predict: modules listed by the terminal view
    max_depth: int = 6  # predict: tree levels drawn in the HTML / PNG icicle
    source: str = "auto"  # energy explained: auto (predicted, else measured) | predicted | measured
    max_trees: int = 4  # predict: trees explained (HTML, PNG, text): the first N predicted
    views: bool = True  # predict: write the explanation views at all


@dataclass
class MeasureConfig(ProtocolSettings, MeterSettings):
    """``stage=measure``: the protocol and meter fields (and their defaults) are inherited from
    :class:`irene.measure.settings.ProtocolSettings` and :class:`~irene.measure.settings.MeterSettings`;
    the stage's own fields follow. The block is instantiated (``OmegaConf.to_object``) into
    the settings the protocol and the meter factory take."""

    device: str = "auto"  # where the model runs: auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    attn_implementation: str = "eager"  # eager: MatMul/Softmax leaves | sdpa: one attention leaf
    convention: str = "physical"  # static features: physical | irene (the published mem_bytes formulas)
    measure: bool = True  # false: trace static features only (num_parameters, flops, mem_bytes)
    seed: int = 0  # seed of the random input token ids
    output: str = "${oc.env:PWD}/outputs/measured/trees.jsonl"  # the trees file a sweep appends to
    track: bool = True  # log the run to MLflow (pipelines.common.tracked_run)

    def validate(self, prefix: str = "measure.") -> MeasureConfig:
        """Every range of the block; a :class:`SettingsError` names the first bad field."""
        ProtocolSettings.validate(self, prefix)
        MeterSettings.validate(self, prefix)
        device = self.device.split(":")
        if not (self.device in ("auto", "cpu", "cuda") or (device[0] == "cuda" and len(device) == 2
                                                            and device[1].isdigit())):
            raise SettingsError(f"{prefix}device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if len(device) == 2 and int(device[1]) != self.gpu_index:
            raise SettingsError(f"{prefix}device: {self.device} is not the GPU the meter reads "
                                f"({prefix}gpu_index={self.gpu_index}): use device=cuda and gpu_index=N")
        if self.convention not in ("physical", "irene"):
            raise SettingsError(f"{prefix}convention: must be physical or irene, got {self.convention!r}")
        return self


@dataclass
class Config:
    stage: str = "crossvalidate"  # one of run.py STAGES (train, predict, whatif, crossvalidate...)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)  # stage=measure: protocol, meter, output
    model: str | None = None  # measure, predict: registry name (e.g. bert-base-uncased) or config.json
    batch_size: int = 8  # measure, predict: input batch size
    seq_len: int = 128  # measure, predict: input sequence length
    shapes: list[list[int]] | None = None  # predict: [[batch_size, seq_len], ...] instead of one pair
    model_dir: str | None = None  # train: output (default: run folder); predict/whatif: trained model
    model_run: str | None = None  # predict/whatif: MLflow run id of stage=train (its "model" artifact)
    unseen_op: str | None = None  # predict/whatif: unseen primitive: null (predictor's) | error | <type>
    trace_convention: str = "irene"  # predict: tracer's convention: irene (published data) | physical
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # predict: explanation views
    package: bool = False  # predict: also log the predictor as an MLflow pyfunc model
    models: list[str] | None = None  # whatif: models compared side by side
    batch_sizes: list[int] | None = None  # whatif: batch sizes (default: [batch_size])
    seq_lens: list[int] | None = None  # whatif: sequence lengths (default: [seq_len])
    trees: str | None = None  # predict/evaluate: input trees (default: the data set)
    predictions: str | None = None  # evaluate: predicted trees
    output: str | None = None  # predict: output file (default: run folder)
    sweep_name: str | None = None  # preset name, tagged on the runs of a sweep (report reads it)
    resume: bool = False  # skip a stage whose identical config already has a FINISHED run
    skip_not_applicable: bool = False  # a predictor that cannot use these features: skip, not fail
    save_predictions: bool = True  # crossvalidate: write the out-of-fold predicted trees
    report: dict[str, Any] = field(default_factory=dict)  # report: table layout (see report.py)
    run_dir: str | None = None  # where the stage writes (default: Hydra's run folder)
    threads: int = 0  # torch threads (0: leave torch's default)
    show_progress: bool = True  # progress bars


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
