"""The typed job configuration: one YAML per job, loaded into ``JobConfig``.

Loading goes ``OmegaConf.structured`` (defaults, with the model section seeded from its flavor) → merge the YAML
→ merge ``key=value`` overrides → ``to_object``. Unknown keys and wrong types raise ``ConfigError`` naming the key
and the file (or "command-line override"); cross-field rules live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlmoe.errors import ConfigError
from dlmoe.model.config import ModelConfig, get_flavor

HELDOUT = "heldout"

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS_DIR = REPO_ROOT / "jobs"
DEFAULT_JOB = JOBS_DIR / "debug.yaml"
OVERRIDE_SOURCE = "command-line override"


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


@dataclass
class ObjectiveConfig:
    """Masked-diffusion objective (reference §4)."""

    kind: str = "pretrain"
    eps: float = 1e-3
    variable_length_prob: float = 0.01
    stratified_t: bool = False
    balance: BalanceConfig = field(default_factory=BalanceConfig)


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
    validation: str = ""    # a held-out tokenized dataset, or `heldout`: the one carved beside data.uri

    @property
    def validation_uri(self) -> str:
        """The validation dataset: ``validation``, where ``heldout`` names the held-out set that
        ``dlmoe tokenize --validation-fraction`` carved inside the training dataset at ``uri``."""
        if self.validation != HELDOUT:
            return self.validation
        from data_pipeline.shards import HELDOUT_FOLDER

        return f"{self.uri.rstrip('/')}/{HELDOUT_FOLDER}"


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


@dataclass
class ParallelConfig:
    num_workers: int = 1
    use_gpu: bool = False
    ep_size: int = 1
    zero_stage: int = 0


@dataclass
class FaultInjectionConfig:
    """Test-only: stop worker ``rank`` once when it reaches ``step`` (off while either is negative) — ``kind``
    ``kill``: a hard crash, no cleanup; ``sigterm``: the signal Kubernetes sends a pod it ends."""

    rank: int = -1
    step: int = -1
    kind: str = "kill"

    @property
    def enabled(self) -> bool:
        return self.rank >= 0 and self.step >= 0


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

    def validate(self, source: str | None = None) -> None:
        """Cross-field rules; raises ``ConfigError`` naming the offending key."""
        self.model.validate(source=source)

        def fail(key: str, message: str) -> None:
            raise ConfigError(message, key=key, source=source)

        def choice(key: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                shown = ", ".join(option or "'' (none)" for option in options)
                fail(key, f"must be one of {shown}; got '{value}'")

        def positive(key: str, value: float) -> None:
            if value <= 0:
                fail(key, f"must be positive, got {value}")

        m, o, d, t, p = self.model, self.objective, self.data, self.train, self.parallel
        choice("objective.kind", o.kind, ("pretrain", "sft"))
        choice("objective.balance.mode", o.balance.mode, ("aux_loss", "aux_free", "none"))
        choice("train.schedule", t.schedule, ("constant", "cosine", "wsd"))
        choice("train.precision", t.precision, ("fp32", "bf16"))
        choice("fault_injection.kind", self.fault_injection.kind, ("kill", "sigterm"))
        if self.export.dtype not in ("", "bf16", "fp32"):
            fail("export.dtype", f"must be bf16, fp32 or empty (as trained); got '{self.export.dtype}'")
        if self.export.every_n_checkpoints < 0:
            fail("export.every_n_checkpoints", f"must be non-negative (0: no exports of checkpoints), got "
                                               f"{self.export.every_n_checkpoints}")
        if self.export.register and not self.tracking.enabled:
            fail("export.register", "registering exports in MLflow needs tracking.enabled=true")
        if not 0.0 <= o.eps < 1.0:
            fail("objective.eps", f"must lie in [0, 1), got {o.eps}")
        if not 0.0 <= o.variable_length_prob <= 1.0:
            fail("objective.variable_length_prob", f"must lie in [0, 1], got {o.variable_length_prob}")
        for key, value in (("objective.balance.aux_loss_coef", o.balance.aux_loss_coef),
                           ("objective.balance.z_loss_coef", o.balance.z_loss_coef)):
            if value < 0:
                fail(key, f"must be non-negative, got {value}")
        if o.balance.mode == "aux_free":
            positive("objective.balance.bias_update_rate", o.balance.bias_update_rate)
        for key, ivalue in (("data.seq_len", d.seq_len), ("data.global_batch_size", d.global_batch_size),
                            ("data.micro_batch_size", d.micro_batch_size), ("train.steps", t.steps),
                            ("parallel.num_workers", p.num_workers), ("parallel.ep_size", p.ep_size),
                            ("checkpoint.every_steps", self.checkpoint.every_steps),
                            ("checkpoint.num_to_keep", self.checkpoint.num_to_keep),
                            ("train.log_every", t.log_every), ("monitor.expert_load_every",
                                                               self.monitor.expert_load_every),
                            ("monitor.mask_buckets", self.monitor.mask_buckets)):
            positive(key, ivalue)
        if not 0.0 <= self.monitor.dead_fraction < 1.0:
            fail("monitor.dead_fraction", f"must be in [0, 1) (a fraction of the fair share 1/E), got "
                                          f"{self.monitor.dead_fraction}")
        positive("train.lr", t.lr)
        positive("checkpoint.sigterm_grace_s", self.checkpoint.sigterm_grace_s)
        positive("train.eval_batches", t.eval_batches)
        if t.eval_every < 0:
            fail("train.eval_every", f"must be non-negative (0: no validation), got {t.eval_every}")
        if t.eval_every and not d.validation:
            fail("train.eval_every", "validation needs a held-out dataset in data.validation")
        if d.validation and not t.eval_every:
            fail("data.validation", "set train.eval_every to say how often to evaluate it")
        if d.validation == HELDOUT and not d.uri:
            fail("data.validation", "'heldout' is the held-out set dlmoe tokenize --validation-fraction carves inside "
                                    "the dataset at data.uri; the embedded default corpus has none: set data.uri")
        c = self.checkpoint
        choice("checkpoint.score_attribute", c.score_attribute, ("", "val_loss", "loss"))
        choice("checkpoint.score_order", c.score_order, ("min", "max"))
        if c.score_attribute == "val_loss" and (not t.eval_every or c.every_steps % t.eval_every):
            fail("checkpoint.score_attribute", f"keeping checkpoints by val_loss needs a validation loss at every "
                                               f"checkpoint: checkpoint.every_steps ({c.every_steps}) must be a "
                                               f"multiple of train.eval_every ({t.eval_every})")
        if d.seq_len > m.max_position_embeddings:
            fail("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings {m.max_position_embeddings}")
        if d.global_batch_size % p.num_workers != 0:
            fail("data.global_batch_size", f"{d.global_batch_size} is not a multiple of parallel.num_workers "
                                           f"{p.num_workers}")
        share = d.global_batch_size // p.num_workers
        if share % self.micro_batch_per_worker != 0:
            fail("data.micro_batch_size", f"a worker's share of the global batch, {share}, is not a multiple of "
                                          f"its micro-batch {self.micro_batch_per_worker}")
        if m.num_experts % p.ep_size != 0:
            fail("parallel.ep_size", f"{p.ep_size} does not divide model.num_experts {m.num_experts}")
        if p.num_workers % p.ep_size != 0:
            fail("parallel.ep_size", f"{p.ep_size} does not divide parallel.num_workers {p.num_workers}")
        if p.zero_stage not in (0, 1, 2):
            fail("parallel.zero_stage", f"must be 0, 1 or 2 (ZeRO-3 is not supported with expert parallelism), "
                                        f"got {p.zero_stage}")
        if not 0 <= t.warmup_steps < t.steps:
            fail("train.warmup_steps", f"must lie in [0, train.steps={t.steps}), got {t.warmup_steps}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            fail("train.min_lr_ratio", f"must lie in [0, 1], got {t.min_lr_ratio}")
        if not 0.0 <= t.decay_fraction <= 1.0:
            fail("train.decay_fraction", f"must lie in [0, 1], got {t.decay_fraction}")
        if t.grad_clip < 0:
            fail("train.grad_clip", f"must be non-negative (0 disables clipping), got {t.grad_clip}")
        if self.export.enabled and o.balance.mode == "aux_free":
            fail("objective.balance.mode", "aux_free biases expert selection, which the release's Hugging Face format "
                                           "cannot express; use aux_loss or none, or set export.enabled=false")
        if self.export.enabled and m.norm_topk_prob:
            fail("model.norm_topk_prob", "the release's modeling code never renormalises top-k weights, so an "
                                         "export would compute other logits; set it to false or export.enabled=false")
        if t.max_failures < 0:
            fail("train.max_failures", f"must be non-negative, got {t.max_failures}")
        if self.fault_injection.rank >= p.num_workers:
            fail("fault_injection.rank", f"{self.fault_injection.rank} is not a worker rank "
                                         f"(parallel.num_workers {p.num_workers})")
        if not self.run_name or "/" in self.run_name:
            fail("run_name", f"must be a non-empty name without '/', got '{self.run_name}'")


def _to_config_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or None
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(message, key=key, source=source)


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
        raise ConfigError(f"job file not found: {path}")
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
