"""The typed job configuration: one YAML per job, loaded into ``JobConfig``.

Loading goes ``OmegaConf.structured`` (defaults, with the model section seeded from its flavor) → merge the YAML
→ merge ``key=value`` overrides → ``to_object``. Unknown keys and wrong types raise ``ConfigError`` naming the key
and the file (or "command-line override"); each section's own rules live in its ``validate`` (checked through
``Rules``), the rules across sections in ``JobConfig.validate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlmoe.errors import ConfigError
from dlmoe.model.config import ModelConfig, get_flavor

HELDOUT = "heldout"

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = REPO_ROOT / "jobs"
DEFAULT_JOB = JOBS_DIR / "debug.yaml"
OVERRIDE_SOURCE = "command-line override"


class Rules:
    """The checks a section's ``validate`` applies; each failure is a ``ConfigError`` naming the key and
    ``source`` (the file, with its overrides)."""

    def __init__(self, source: str | None) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(message, key=key, source=self.source)

    def choice(self, key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            shown = ", ".join(option or "'' (none)" for option in options)
            self.fail(key, f"must be one of {shown}; got '{value}'")

    def positive(self, key: str, value: float) -> None:
        if value <= 0:
            self.fail(key, f"must be positive, got {value}")

    def non_negative(self, key: str, value: float, meaning: str = "") -> None:
        if value < 0:
            self.fail(key, f"must be non-negative{f' ({meaning})' if meaning else ''}, got {value}")

    def within(self, key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
        if not (low <= value < high if high_open else low <= value <= high):
            self.fail(key, f"must lie in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


@dataclass
class ModelSection(ModelConfig):
    """The model section: a named flavor plus any config.json field to override on top of it, and optionally a
    release-format folder (local or s3://) whose weights training starts from."""

    flavor: str = "debug"
    init_from: str = ""

    def to_model_config(self) -> ModelConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**fields)


@dataclass
class BalanceConfig:
    """Expert load balancing: ``aux_loss`` (Switch loss + z-loss), ``aux_free`` (selection bias, z-loss kept)
    or ``none``. Coefficients keep the reference meaning (0.01 and 0.001; balance loss = 1 at perfect balance)."""

    mode: str = "aux_loss"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    global_counts: bool = True
    bias_update_rate: float = 0.001

    def validate(self, rules: Rules) -> None:
        rules.choice("objective.balance.mode", self.mode, ("aux_loss", "aux_free", "none"))
        rules.non_negative("objective.balance.aux_loss_coef", self.aux_loss_coef)
        rules.non_negative("objective.balance.z_loss_coef", self.z_loss_coef)
        if self.mode == "aux_free":
            rules.positive("objective.balance.bias_update_rate", self.bias_update_rate)


@dataclass
class BlockScheduleConfig:
    """LLaDA 2.0's block-level WSD schedule (``dlmoe.diffusion.blocks``): over the first ``warmup_steps`` the block
    size doubles from ``start_block_size`` towards ``data.seq_len``; then full-sequence diffusion; over the last
    ``decay_steps`` it halves from ``data.seq_len`` down to ``final_block_size``."""

    enabled: bool = False
    warmup_steps: int = 0
    decay_steps: int = 0
    start_block_size: int = 1
    final_block_size: int = 32

    def validate(self, rules: Rules) -> None:
        for key in ("warmup_steps", "decay_steps"):
            rules.non_negative(f"objective.block_schedule.{key}", getattr(self, key))
        for key in ("start_block_size", "final_block_size"):
            rules.positive(f"objective.block_schedule.{key}", getattr(self, key))


@dataclass
class ObjectiveConfig:
    """Masked-diffusion objective (reference §4) and the LLaDA 2.0 options: the noise range ``t_min``/``t_max``,
    ``document_attention`` (packed documents kept apart), block diffusion with ``block_size`` tokens per block
    (0: full sequence) or the ``block_schedule``."""

    kind: str = "pretrain"
    eps: float = 1e-3
    variable_length_prob: float = 0.01
    stratified_t: bool = False
    t_min: float = 0.0
    t_max: float = 1.0
    document_attention: bool = False
    block_size: int = 0
    block_schedule: BlockScheduleConfig = field(default_factory=BlockScheduleConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def validate(self, rules: Rules) -> None:
        rules.choice("objective.kind", self.kind, ("pretrain", "sft"))
        rules.within("objective.eps", self.eps, 0.0, 1.0, high_open=True)
        rules.within("objective.variable_length_prob", self.variable_length_prob, 0.0, 1.0)
        rules.within("objective.t_min", self.t_min, 0.0, 1.0, high_open=True)
        rules.within("objective.t_max", self.t_max, 0.0, 1.0)
        if self.t_max <= self.t_min:
            rules.fail("objective.t_max", f"must exceed objective.t_min ({self.t_min}), got {self.t_max}")
        if self.document_attention and self.kind == "sft":
            rules.fail("objective.document_attention", "an SFT row holds one example; document-level attention "
                                                       "is for packed pretraining rows")
        rules.non_negative("objective.block_size", self.block_size, "0: full-sequence diffusion")
        if self.block_schedule.enabled and self.block_size:
            rules.fail("objective.block_size", "the block schedule sets the block size of every step: leave it at 0, "
                                               "or set objective.block_schedule.enabled=false")
        self.block_schedule.validate(rules)
        self.balance.validate(rules)

    def recipe(self) -> dict[str, Any]:
        """The LLaDA 2.0 settings a model is trained with (empty by default), as the export's dlmoe.json records
        them; ``block_size`` is that of the last steps, the block length the sampler decodes with (0: none)."""
        recipe: dict[str, Any] = {}
        if self.document_attention:
            recipe["document_attention"] = True
        if (self.t_min, self.t_max) != (0.0, 1.0):
            recipe["noise_range"] = [self.t_min, self.t_max]
        if self.block_schedule.enabled:
            recipe["block_schedule"] = dataclasses.asdict(self.block_schedule)
            recipe["block_size"] = self.block_schedule.final_block_size if self.block_schedule.decay_steps else 0
        elif self.block_size:
            recipe["block_size"] = self.block_size
        return recipe


@dataclass
class DataConfig:
    """Where tokenized shards live (a local path or s3:// URI; empty: the embedded default corpus)."""

    uri: str = ""
    seq_len: int = 128
    global_batch_size: int = 8
    micro_batch_size: int = 4
    seed: int = 1234
    tokenizer: str = "byte"
    endpoint_url: str = ""  # S3 endpoint; empty: AWS_ENDPOINT_URL or AWS's default
    validation: str = ""    # a held-out tokenized dataset, or `heldout`: the one carved inside the training dataset

    def validate(self, rules: Rules) -> None:
        for key in ("seq_len", "global_batch_size", "micro_batch_size"):
            rules.positive(f"data.{key}", getattr(self, key))


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "wsd"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    max_failures: int = 2
    precision: str = "fp32"
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0     # validation loss every this many steps (and at the end); 0: none
    eval_batches: int = 2   # global batches of data.validation in the fixed validation set

    def fit_warmup(self) -> None:
        """A warmup as long as the run or longer (the default job's 20 steps in ``train.steps=10``) becomes a
        tenth of the run, with a warning, as a short first experiment expects."""
        if self.warmup_steps >= self.steps > 0:
            fitted = self.steps // 10
            warnings.warn(f"train.warmup_steps={self.warmup_steps} does not fit in train.steps={self.steps}; "
                          f"warming up over {fitted} step{'' if fitted == 1 else 's'} (a tenth of the run) instead",
                          stacklevel=3)
            self.warmup_steps = fitted

    def validate(self, rules: Rules) -> None:
        rules.choice("train.schedule", self.schedule, ("constant", "cosine", "wsd"))
        rules.choice("train.precision", self.precision, ("fp32", "bf16"))
        for key in ("steps", "log_every", "lr", "eval_batches"):
            rules.positive(f"train.{key}", getattr(self, key))
        rules.non_negative("train.eval_every", self.eval_every, "0: no validation")
        if not 0 <= self.warmup_steps < self.steps:
            rules.fail("train.warmup_steps", f"must lie in [0, train.steps={self.steps}), got {self.warmup_steps}")
        rules.within("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        rules.within("train.decay_fraction", self.decay_fraction, 0.0, 1.0)
        rules.non_negative("train.grad_clip", self.grad_clip, "0 disables clipping")
        rules.non_negative("train.max_failures", self.max_failures)


@dataclass
class ParallelConfig:
    num_workers: int = 1
    use_gpu: bool = False
    ep_size: int = 1
    zero_stage: int = 0

    def validate(self, rules: Rules) -> None:
        rules.positive("parallel.num_workers", self.num_workers)
        rules.positive("parallel.ep_size", self.ep_size)
        if self.zero_stage not in (0, 1, 2):
            rules.fail("parallel.zero_stage", f"must be 0, 1 or 2 (ZeRO-3 is not supported with expert "
                                              f"parallelism), got {self.zero_stage}")


@dataclass
class FaultInjectionConfig:
    """Test-only: stop worker ``rank`` once when it reaches ``step`` (off while either is negative) — ``kind``
    ``kill``: a hard crash, no cleanup; ``sigterm``: the signal Kubernetes sends a pod it ends; ``hang``: stand still
    (for a test to kill the driver meanwhile)."""

    rank: int = -1
    step: int = -1
    kind: str = "kill"

    @property
    def enabled(self) -> bool:
        return self.rank >= 0 and self.step >= 0

    def validate(self, rules: Rules) -> None:
        rules.choice("fault_injection.kind", self.kind, ("kill", "sigterm", "hang"))


@dataclass
class CheckpointConfig:
    """Checkpoints every ``every_steps`` under ``{storage}/{run_name}/``. Ray Train keeps ``num_to_keep`` of them:
    the newest, or with ``score_attribute`` (``val_loss`` or ``loss``) the best by ``score_order`` — and always
    the newest as well, which a restart resumes from."""

    storage: str = "runs"
    every_steps: int = 100
    num_to_keep: int = 2
    score_attribute: str = ""
    score_order: str = "min"
    sigterm_grace_s: float = 25.0  # how long a worker given SIGTERM may take to reach a checkpoint
    lock_timeout_s: float = 60.0  # a run lock not renewed for this long belongs to a driver that is gone
    # A checkpoint that cannot be written (storage refusing writes, a full disk): ``fail`` ends the run naming the
    # folder, ``continue`` warns and trains on, trying again at the next checkpoint. Earlier checkpoints stay valid.
    on_write_error: str = "fail"

    def validate(self, rules: Rules) -> None:
        rules.positive("checkpoint.every_steps", self.every_steps)
        rules.positive("checkpoint.num_to_keep", self.num_to_keep)
        rules.positive("checkpoint.sigterm_grace_s", self.sigterm_grace_s)
        rules.positive("checkpoint.lock_timeout_s", self.lock_timeout_s)
        rules.choice("checkpoint.score_attribute", self.score_attribute, ("", "val_loss", "loss"))
        rules.choice("checkpoint.score_order", self.score_order, ("min", "max"))
        rules.choice("checkpoint.on_write_error", self.on_write_error, ("fail", "continue"))


@dataclass
class ExportConfig:
    """Hugging Face exports of a run: the final model at ``uri`` (``at_end``), and every ``every_n_checkpoints``-th
    checkpoint at ``{uri}-step-{N:08d}`` as a Ray task beside training. ``uri`` defaults to
    ``{checkpoint.storage}/{run_name}/hf``; ``register`` names an MLflow registered model that gets each export as a
    version (``models:/NAME/latest`` is the newest); ``dtype`` is ``bf16``, ``fp32`` or empty (as trained)."""

    enabled: bool = True
    at_end: bool = True
    every_n_checkpoints: int = 0
    uri: str = ""
    register: str = ""
    dtype: str = ""

    def validate(self, rules: Rules) -> None:
        if self.dtype not in ("", "bf16", "fp32"):
            rules.fail("export.dtype", f"must be bf16, fp32 or empty (as trained); got '{self.dtype}'")
        rules.non_negative("export.every_n_checkpoints", self.every_n_checkpoints, "0: no exports of checkpoints")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""
    experiment: str = "dlmoe"


@dataclass
class MonitorConfig:
    """Expert-load monitoring (``dlmoe.monitor``): every ``expert_load_every`` steps, the layer × expert token share
    over the steps since the last one, split into ``mask_buckets`` equal bins of the mask ratio t, goes to MLflow as
    an ``expert_load/`` artifact. An expert is counted dead over a window when its share is at most
    ``dead_fraction`` of the fair share 1/E."""

    expert_load_every: int = 50
    mask_buckets: int = 5
    dead_fraction: float = 0.1

    def validate(self, rules: Rules) -> None:
        rules.positive("monitor.expert_load_every", self.expert_load_every)
        rules.positive("monitor.mask_buckets", self.mask_buckets)
        if not 0.0 <= self.dead_fraction < 1.0:
            rules.fail("monitor.dead_fraction", f"must be in [0, 1) (a fraction of the fair share 1/E), got "
                                                f"{self.dead_fraction}")


@dataclass
class JobConfig:
    run_name: str = "debug"
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)

    @property
    def micro_batch_per_worker(self) -> int:
        """Samples one worker runs at once: ``data.micro_batch_size``, or its whole share if that is smaller."""
        return min(self.data.micro_batch_size, max(1, self.data.global_batch_size // self.parallel.num_workers))

    @property
    def accumulation_steps(self) -> int:
        return self.data.global_batch_size // (self.parallel.num_workers * self.micro_batch_per_worker)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    def config_hash(self) -> str:
        """sha256 of the resolved config (stable key order)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def dataset_uri(self) -> str:
        """The training dataset: ``data.uri``, or where the embedded default corpus is tokenized once (under the
        storage, with a held-out tenth)."""
        if self.data.uri:
            return self.data.uri
        return f"{self.checkpoint.storage.rstrip('/')}/data/stdlib-bytes-{self.data.seq_len}"

    @property
    def validation_uri(self) -> str:
        """The validation dataset: ``data.validation``, where ``heldout`` names the held-out set that
        ``dlmoe tokenize --validation-fraction`` carved inside the training dataset (the default corpus has one)."""
        if self.data.validation != HELDOUT:
            return self.data.validation
        from data_pipeline.shards import HELDOUT_FOLDER

        return f"{self.dataset_uri.rstrip('/')}/{HELDOUT_FOLDER}"

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint of every storage access of the job: ``data.endpoint_url``, or ``None`` for
        ``AWS_ENDPOINT_URL`` or AWS's default."""
        return self.data.endpoint_url or None

    def validate(self, source: str | None = None) -> None:
        """Every section's rules, then those across sections; raises ``ConfigError`` naming the offending key."""
        self.model.validate(source=source)
        rules = Rules(source)
        for section in (self.objective, self.data, self.train, self.parallel, self.checkpoint, self.export,
                        self.monitor, self.fault_injection):
            section.validate(rules)
        m, o, d, t, p, c = self.model, self.objective, self.data, self.train, self.parallel, self.checkpoint
        if self.export.register and not self.tracking.enabled:
            rules.fail("export.register", "registering exports in MLflow needs tracking.enabled=true")
        if t.eval_every and not d.validation:
            rules.fail("train.eval_every", "validation needs a held-out dataset in data.validation")
        if d.validation and not t.eval_every:
            rules.fail("data.validation", "set train.eval_every to say how often to evaluate it")
        if c.score_attribute == "val_loss" and (not t.eval_every or c.every_steps % t.eval_every):
            rules.fail("checkpoint.score_attribute", f"keeping checkpoints by val_loss needs a validation loss at "
                                                     f"every checkpoint: checkpoint.every_steps ({c.every_steps}) "
                                                     f"must be a multiple of train.eval_every ({t.eval_every})")
        bs = o.block_schedule
        if bs.enabled and bs.warmup_steps + bs.decay_steps > t.steps:
            rules.fail("objective.block_schedule.decay_steps", f"warmup_steps {bs.warmup_steps} + decay_steps "
                                                               f"{bs.decay_steps} exceed train.steps {t.steps}")
        if bs.enabled and bs.final_block_size >= d.seq_len:
            rules.fail("objective.block_schedule.final_block_size", f"{bs.final_block_size} must be below "
                                                                    f"data.seq_len {d.seq_len}")
        if d.seq_len > m.max_position_embeddings:
            rules.fail("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings "
                                       f"{m.max_position_embeddings}")
        if d.global_batch_size % p.num_workers != 0:
            rules.fail("data.global_batch_size", f"{d.global_batch_size} is not a multiple of parallel.num_workers "
                                                 f"{p.num_workers}")
        share = d.global_batch_size // p.num_workers
        if share % self.micro_batch_per_worker != 0:
            rules.fail("data.micro_batch_size", f"a worker's share of the global batch, {share}, is not a multiple "
                                                f"of its micro-batch {self.micro_batch_per_worker}")
        if m.num_experts % p.ep_size != 0:
            rules.fail("parallel.ep_size", f"{p.ep_size} does not divide model.num_experts {m.num_experts}")
        if p.num_workers % p.ep_size != 0:
            rules.fail("parallel.ep_size", f"{p.ep_size} does not divide parallel.num_workers {p.num_workers}")
        if self.export.enabled and o.balance.mode == "aux_free":
            rules.fail("objective.balance.mode", "aux_free biases expert selection, which the release's Hugging Face "
                                                 "format cannot express; use aux_loss or none, or set "
                                                 "export.enabled=false")
        if self.export.enabled and m.norm_topk_prob:
            rules.fail("model.norm_topk_prob", "the release's modeling code never renormalises top-k weights, so an "
                                               "export would compute other logits; set it to false or "
                                               "export.enabled=false")
        if self.fault_injection.rank >= p.num_workers:
            rules.fail("fault_injection.rank", f"{self.fault_injection.rank} is not a worker rank "
                                               f"(parallel.num_workers {p.num_workers})")
        if not self.run_name or "/" in self.run_name:
            rules.fail("run_name", f"must be a non-empty name without '/', got '{self.run_name}'")


def _to_config_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or None
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(message, key=key, source=source)


def _section_given_a_value(schema: DictConfig, cfg: DictConfig, prefix: str = "") -> str | None:
    """The dotted key of the first section of ``schema`` that ``cfg`` sets to a plain value (``train: 5``)."""
    for name, value in cfg.items():
        key = str(name)
        if key not in schema or not isinstance(schema[key], DictConfig):
            continue
        if not isinstance(value, DictConfig):
            return f"{prefix}{key}"
        inner = _section_given_a_value(schema[key], value, f"{prefix}{key}.")
        if inner is not None:
            return inner
    return None


def _flavor_of(yaml_cfg: DictConfig, overrides_cfg: DictConfig) -> str:
    for cfg in (overrides_cfg, yaml_cfg):
        model = cfg.get("model")
        if isinstance(model, DictConfig) and "flavor" in model:
            return str(model.flavor)
    return "debug"


def _sets_key(cfg: DictConfig, section: str, key: str) -> bool:
    node = cfg.get(section)
    return isinstance(node, DictConfig) and key in node


def load_job_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load, merge and validate a job YAML (``None``: the embedded default ``jobs/debug.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_JOB
    source = str(path)
    if not path.is_file():
        # ``dlmoe train train.steps`` is an override missing its value more often than a job file.
        hint = "" if path.suffix in (".yaml", ".yml") else "; an override is key=value (e.g. train.steps=50)"
        raise ConfigError(f"job file not found: {path}{hint}")
    try:
        yaml_cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: re-raised with the file named
        raise ConfigError(f"cannot parse YAML: {exc}", source=source) from exc
    if isinstance(yaml_cfg, ListConfig):
        raise ConfigError("a job file must be a mapping of sections, not a list", source=source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value", source=OVERRIDE_SOURCE)
    try:
        overrides_cfg = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as exc:
        raise _to_config_error(exc, OVERRIDE_SOURCE) from exc

    flavor = _flavor_of(yaml_cfg, overrides_cfg)
    try:
        base = get_flavor(flavor)
    except ConfigError as exc:
        where = OVERRIDE_SOURCE if _sets_key(overrides_cfg, "model", "flavor") else source
        raise ConfigError(str(exc.args[0]).split(" (key")[0], key="model.flavor", source=where) from exc
    schema = OmegaConf.structured(JobConfig(model=ModelSection(flavor=flavor, **dataclasses.asdict(base))))
    merged = schema
    for cfg, where in ((yaml_cfg, source), (overrides_cfg, OVERRIDE_SOURCE)):
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as exc:
            section = _section_given_a_value(merged, cfg)
            if section is not None:  # OmegaConf's merge error names no key for this one
                raise ConfigError("a section takes keys, not a value", key=section, source=where) from exc
            raise _to_config_error(exc, where) from exc
    try:
        job = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _to_config_error(exc, source) from exc
    assert isinstance(job, JobConfig)
    # Changing the depth without spelling out moe_layer_freq means "every layer is MoE", as in the release.
    freq_given = _sets_key(yaml_cfg, "model", "moe_layer_freq") or _sets_key(overrides_cfg, "model", "moe_layer_freq")
    if not freq_given and len(job.model.moe_layer_freq) != job.model.num_hidden_layers:
        job.model.moe_layer_freq = [1] * job.model.num_hidden_layers
    job.train.fit_warmup()
    job.validate(source=f"{source} with overrides {' '.join(overrides)}" if overrides else source)
    return job


def job_from_dict(data: dict[str, Any], source: str = "a resolved job") -> JobConfig:
    """A ``JobConfig`` from ``JobConfig.to_dict()`` output (as shipped to Ray workers), validated again."""
    try:
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.create(data)))
    except OmegaConfBaseException as exc:
        raise _to_config_error(exc, source) from exc
    assert isinstance(job, JobConfig)
    job.validate(source=source)
    return job
