"""The typed experiment config: lessctl.toml + command-line overrides, validated once.

Precedence: the defaults here (the paper's settings) < the workspace file < options given to a
command. Every problem (unknown key, wrong type, bad value) is reported at once, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lessctl.config_study import StudyConfig, study_problems
from lessctl.errors import ConfigError
from lessctl.vocab import (
    BUILTIN_TARGETS,
    CHAT_FORMATS,
    DTYPES,
    KV_CACHES,
    LOSS_WEIGHTINGS,
    METHODS,
    PROJECTOR_KINDS,
    STEP_STREAMS,
    closest,
    seed_problem,
    spelled,
    type_problem,
)

CONFIG_NAME = "lessctl.toml"
# Keys of a custom target: its LESS examples, an optional subtask key, an optional held-out eval file.
TARGET_KEYS = ("file", "subtask_key", "eval_file")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("less", "Name of the experiment (used in job names and reports).")
    output_dir: str = _f("out", "Output folder, relative to the workspace file.")
    seed: int = _f(3, "Seed of the random selection baseline (training seeds are in [warmup] and [finetune]).")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _f(
        "meta-llama/Llama-2-7b-hf", "Base model: a local folder or a hub name (offline: must be cached)."
    )
    dtype: str = _f("auto", "Training dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")
    max_seq_length: int = _f(2048, "Tokens per example; longer examples are truncated.")
    chat_format: str = _f("tulu", "Chat format of the training text: tulu or llama2.")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(128, "LoRA rank.")
    alpha: int = _f(512, "LoRA alpha.")
    dropout: float = _f(0.1, "LoRA dropout (training only; gradients are taken in eval mode).")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules that get LoRA adapters.")


@dataclass(frozen=True)
class TrainConfig:
    percentage: float = _f(0.05, "Share of each training file used (the warmup subset; 1.0 keeps all).")
    epochs: int = _f(4, "Training epochs; warmup saves a checkpoint at the end of each.")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")
    warmup_ratio: float = _f(0.03, "Share of optimizer steps with a linear learning-rate warmup.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    batch_size: int = _f(1, "Examples per device per forward pass.")
    gradient_accumulation_steps: int = _f(
        32,
        "Forward passes per optimizer step (effective batch = batch_size x this x devices); used when "
        "effective_batch_size is 0.",
    )
    effective_batch_size: int = _f(
        128,
        "Examples per optimizer step over all devices (the paper's 4 GPUs x 1 x 32 = 128); the accumulation is "
        "this / (batch_size x devices), which must divide exactly. 0: use gradient_accumulation_steps.",
    )
    step_stream: str = _f(
        "less",
        "less (transformers 4.36's, LESS's: the epochs' examples one stream, a step may straddle two epochs, "
        "epochs x floor(examples / step) steps, a checkpoint where each epoch ends: 105, 211, 317, 420 on 13,533 "
        "examples at 128) or epoch (transformers 5's: every epoch ends with a shorter step: 106, 212, 318, 424).",
    )
    loss_weighting: str = _f(
        "example",
        "example (LESS, transformers 4.36: every example's mean token loss weighs the same) or token (transformers "
        "5: summed token losses / label tokens of the step, long examples weigh more).",
    )
    autocast: bool = _f(
        True,
        "Load the base model in float32 and train under [model] dtype's autocast (LESS's way); false: load the base "
        "model in [model] dtype (half the memory in bf16).",
    )
    packing: bool = _f(
        True,
        "Train on padding-free packs of each optimizer step's examples (the same examples, loss and schedule, many "
        "times faster); false: LESS's batch-of-one passes through the Trainer.",
    )
    pack_tokens: int = _f(8192, "Tokens per pack when packing (an example longer than this trains alone).")
    report_to: list = _f([], "transformers' report_to (tensorboard, wandb, ...); log_history.jsonl is always written.")
    sample_data_seed: int = _f(42, "Seed of the subset drawn from the pool (LESS's sample_data_seed).")
    seed: int = _f(0, "The Trainer's seed: LoRA initialisation, dropout, the data order (LESS's --seed 0).")
    data_seed: int = _f(
        -1,
        "Seed of the order of the training data; -1: the Trainer's seed, as transformers 4.36 drew it (LESS's "
        "DATA_SEED=3 went to --data_seed, which 4.36 never read).",
    )
    lr_scheduler: str = _f("linear", "Learning-rate schedule after warmup (transformers name).")
    logging_steps: int = _f(1, "Log the loss every this many optimizer steps.")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    percentage: float = _f(1.0, "Share of the selection to train on (1.0: all of it).")


@dataclass(frozen=True)
class DataConfig:
    train: dict = _f({}, "Training pool: {name = path to a .jsonl, .jsonl.gz or .parquet file}.")
    targets: dict = _f(
        {}, 'Targets: {name = "mmlu"|"bbh"|"tydiqa"} or {name = {file = "path.jsonl", eval_file = "held-out.jsonl"}}.'
    )
    data_dir: str = _f(
        "data", "LESS-layout data folder holding eval/mmlu, eval/bbh, eval/tydiqa (for built-in targets)."
    )


@dataclass(frozen=True)
class GradsConfig:
    dims: list = _f([8192], "Projection dimensions.")
    projector: str = _f(
        "auto",
        "Projector: auto (cuda on a GPU with fast_jl, else basic), cuda, basic, or sketch (a count sketch: much "
        "cheaper, not LESS's matrix).",
    )
    batch_tokens: int = _f(8192, "Token budget of one batch of per-example gradients.")
    block_size: int = _f(128, "BasicProjector block size (LESS uses 128).")
    projection_seed: int = _f(0, "Seed of the random projection (LESS uses 0).")
    compile: bool = _f(
        False,
        "torch.compile the decoder layers for the gradient pass (faster per example on a GPU; the first batch waits "
        "for the compilation: bench/RESULTS.md).",
    )
    merge: bool = _f(
        True,
        "Merge the LoRA adapter into the base weights for the gradient pass: the model then runs without its LoRA "
        "branch (faster on a GPU); the per-example LoRA gradients are unchanged up to the rounding of the merged "
        "weights (bench/RESULTS.md measures it against float32 ground truth).",
    )


@dataclass(frozen=True)
class SelectConfig:
    percentage: float = _f(0.05, "Share of the pooled training sets to select.")
    method: str = _f("less", "Selection method: less, random, bm25, rds (representations) or dsir.")


@dataclass(frozen=True)
class EvalConfig:
    data_dir: str = _f("", "LESS-layout data folder for evaluation (default: [data] data_dir).")
    batch_size: int = _f(8, "Prompts per forward pass / generation batch.")
    bbh_examples_per_task: int = _f(40, "Seeded sample of examples per BBH task (LESS: 40; 0: all).")
    bbh_sample: str = _f(
        "less",
        "How the BBH sample is drawn: less (random.seed(42) once, random.sample per task in sorted task order: "
        "LESS's draw, which followed the file system's order) or per_task (a seeded sample per task, independent "
        "of the other tasks).",
    )
    tydiqa_questions_per_language: int = _f(200, "Seeded sample of TydiQA questions per language (LESS: 200; 0: all).")
    limit: int = _f(0, "Examples per subject/task/language (0: all).")
    kv_cache: str = _f(
        "auto",
        "KV cache of BBH and TydiQA generation: auto (static on a GPU: one compiled decoding step; dynamic on the "
        "CPU), static or dynamic. Both give the same greedy text (tests/test_generation.py).",
    )


@dataclass(frozen=True)
class SlurmConfig:
    partition: str = _f("", "Partition (#SBATCH --partition); empty: the cluster's default.")
    account: str = _f("", "Account to charge (#SBATCH --account).")
    qos: str = _f("", "Quality of service (#SBATCH --qos).")
    gpus: int = _f(1, "GPUs per job for GPU stages.")
    cpus: int = _f(8, "CPUs per task.")
    memory: str = _f("", "Memory per node, e.g. 64G; empty: the cluster's default.")
    time: str = _f("12:00:00", "Time limit per job.")
    modules: list = _f([], "Environment modules to load (module load ...).")
    setup: list = _f([], "Shell lines run before the stage (e.g. activating a virtual environment).")
    sbatch_extra: list = _f([], "Extra #SBATCH lines, e.g. '--constraint=a100'.")
    env: dict = _f({}, "Environment variables exported in the job.")
    templates: str = _f("", "A folder of your own templates overriding the shipped ones.")
    stages: dict = _f({}, "Per-stage overrides, e.g. [slurm.stages.grads] time = '48:00:00'.")


@dataclass(frozen=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: TrainConfig = field(default_factory=TrainConfig)
    grads: GradsConfig = field(default_factory=GradsConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    # Not part of the file: where it was read from (None: defaults only), and the sections it (or an option) set.
    path: Path | None = field(default=None, compare=False)
    given: frozenset = field(default=frozenset(), compare=False)

    @property
    def root(self) -> Path:
        """The workspace folder: relative paths in the file are relative to it."""
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, p: str | os.PathLike) -> Path:
        q = Path(os.path.expanduser(str(p)))
        return q if q.is_absolute() else (self.root / q)

    def model_ref(self, name_or_path: str | None = None) -> str:
        """A model as the loaders take it: the absolute path of a local folder (relative paths are
        relative to the workspace), else the name as given (a hub name). Default: [model] name_or_path."""
        name = name_or_path or self.model.name_or_path
        local = self.resolve(name)
        return str(local.resolve()) if local.exists() else name

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.experiment.output_dir)

    def train_files(self) -> dict[str, Path]:
        return {name: self.resolve(p) for name, p in self.data.train.items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path", None), d.pop("given", None)
        return d


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("path", "given")}


def _check_type(key: str, value: Any, typ: Any, problems: list[str]) -> Any:
    """Checks (and lightly coerces: int -> float) one value; appends a problem naming the key."""
    problem = type_problem(key, value, typ)
    if problem:
        problems.append(problem)
        return value
    return float(value) if typ in ("float", float) else value


_OPTIONS = {"eval.bbh_examples_per_task": "--bbh-examples", "grads.merge": "--merge", "grads.compile": "--compile"}


def option_name(key: str) -> str:
    """The command-line option that sets `section.key` (`grads.batch_tokens` -> `--batch-tokens`)."""
    return _OPTIONS.get(key) or "--" + key.partition(".")[2].replace("_", "-")


SEEDS = ("seed", "sample_data_seed", "data_seed")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
NAME_MAX = 64  # a name is part of file names (`<name>-ckpt<step>-<type>.h5.part`, `<target>-<method>-s<seed>`)
NAME_RULE = f"letters, digits and _ . + - only, not starting with . + or -, at most {NAME_MAX} characters"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a data set, target or model folder (None when it can): NAME_RULE."""
    if not NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
        return f"{name[:40]!r}{'...' if len(name) > 40 else ''} ({len(name)} characters): a name may hold {NAME_RULE}"
    return None


def _validate_values(cfg: Config, label: Callable[[str], str], problems: list[str]) -> None:
    def bad(key: str, msg: str) -> None:
        problems.append(f"{label(key)}: {msg}")

    if cfg.model.chat_format not in CHAT_FORMATS:
        bad("model.chat_format", f"expected {spelled(CHAT_FORMATS)}, got {cfg.model.chat_format!r}")
    if cfg.model.dtype not in DTYPES:
        bad("model.dtype", f"expected {spelled(DTYPES)}, got {cfg.model.dtype!r}")
    if cfg.model.max_seq_length <= 0:
        bad("model.max_seq_length", "must be positive")
    if cfg.lora.r < 1:
        bad("lora.r", f"the LoRA rank must be at least 1, got {cfg.lora.r}")
    if cfg.lora.alpha <= 0:
        bad("lora.alpha", f"must be positive, got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        bad("lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules or not all(isinstance(m, str) and m for m in cfg.lora.target_modules):
        bad("lora.target_modules", f"expected a list of module names, got {cfg.lora.target_modules!r}")
    for sec in ("warmup", "finetune"):
        t = getattr(cfg, sec)
        if not 0 < t.percentage <= 1:
            bad(f"{sec}.percentage", f"must be in (0, 1], got {t.percentage}")
        if t.epochs < 1:
            bad(f"{sec}.epochs", f"must be at least 1, got {t.epochs}")
        if not 0 <= t.warmup_ratio < 1:
            bad(f"{sec}.warmup_ratio", "must be in [0, 1)")
        if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
            bad(f"{sec}.learning_rate", f"must be a positive number, got {t.learning_rate}")
        if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
            problems.append(
                f"{label(sec + '.batch_size')}: batch_size and gradient_accumulation_steps must be at least 1"
            )
        if t.logging_steps < 1 or t.pack_tokens < 1:
            bad(f"{sec}.{'pack_tokens' if t.pack_tokens < 1 else 'logging_steps'}", "must be at least 1")
        if t.effective_batch_size < 0:
            bad(f"{sec}.effective_batch_size", "must be 0 (unset) or positive")
        if not all(isinstance(x, str) for x in t.report_to):
            bad(f"{sec}.report_to", f"expected a list of names such as ['tensorboard'], got {t.report_to!r}")
        if t.step_stream not in STEP_STREAMS:
            bad(f"{sec}.step_stream", f"expected {spelled(STEP_STREAMS)}, got {t.step_stream!r}")
        if t.data_seed < -1:
            bad(f"{sec}.data_seed", f"must be -1 (the Trainer's seed) or a seed, got {t.data_seed}")
        if t.loss_weighting not in LOSS_WEIGHTINGS:
            bad(f"{sec}.loss_weighting", f"expected {spelled(LOSS_WEIGHTINGS)}, got {t.loss_weighting!r}")
    if not 0 < cfg.select.percentage <= 1:
        bad("select.percentage", f"must be in (0, 1], got {cfg.select.percentage}")
    if cfg.select.method not in METHODS:
        bad("select.method", f"expected {spelled(METHODS)}, got {cfg.select.method!r}")
    if cfg.grads.projector not in PROJECTOR_KINDS:
        bad("grads.projector", f"expected {spelled(PROJECTOR_KINDS)}, got {cfg.grads.projector!r}")
    if not cfg.grads.dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in cfg.grads.dims):
        bad("grads.dims", f"expected a list of positive integers, got {cfg.grads.dims!r}")
    if cfg.grads.batch_tokens < 1:
        bad("grads.batch_tokens", f"must be at least 1, got {cfg.grads.batch_tokens}")
    if cfg.grads.block_size < 1:
        bad("grads.block_size", f"must be at least 1, got {cfg.grads.block_size}")
    if cfg.eval.batch_size < 1:
        bad("eval.batch_size", f"must be at least 1, got {cfg.eval.batch_size}")
    if cfg.eval.bbh_sample not in ("less", "per_task"):
        bad("eval.bbh_sample", f"expected less or per_task, got {cfg.eval.bbh_sample!r}")
    if cfg.eval.kv_cache not in KV_CACHES:
        bad("eval.kv_cache", f"expected {spelled(KV_CACHES)}, got {cfg.eval.kv_cache!r}")
    if cfg.eval.limit < 0:
        bad("eval.limit", f"must be 0 (all) or more, got {cfg.eval.limit}")
    if cfg.eval.bbh_examples_per_task < 0:
        bad("eval.bbh_examples_per_task", f"must be 0 (all) or more, got {cfg.eval.bbh_examples_per_task}")
    if cfg.eval.tydiqa_questions_per_language < 0:
        bad(
            "eval.tydiqa_questions_per_language",
            f"must be 0 (all) or more, got {cfg.eval.tydiqa_questions_per_language}",
        )
    for key, seed in (
        ("experiment.seed", cfg.experiment.seed),
        ("grads.projection_seed", cfg.grads.projection_seed),
        *((f"{sec}.{k}", getattr(getattr(cfg, sec), k)) for sec in ("warmup", "finetune") for k in SEEDS),
    ):
        if key.endswith(".data_seed") and seed == -1:  # -1: the data order comes from the Trainer's seed
            continue
        if problem := seed_problem(seed):
            bad(key, problem)
    for section, names in (("data.train", cfg.data.train), ("data.targets", cfg.data.targets)):
        for name in names:
            if problem := name_problem(str(name)):
                short = str(name) if len(str(name)) <= 40 else str(name)[:40] + "..."
                bad(f"{section}.{short}", f"{problem} (it names files and folders)")
    for name, path in cfg.data.train.items():
        if not isinstance(path, str):
            bad(f"data.train.{name}", f"expected a path string, got {path!r}")
    for name, spec in cfg.data.targets.items():
        if isinstance(spec, str):
            if spec not in BUILTIN_TARGETS:
                bad(
                    f"data.targets.{name}",
                    f"unknown built-in target {spec!r}{closest(spec, list(BUILTIN_TARGETS))}; a custom target is "
                    f'{{file = "path.jsonl"}}',
                )
        elif isinstance(spec, dict):
            unknown = set(spec) - set(TARGET_KEYS)
            if "file" not in spec:
                bad(f"data.targets.{name}", 'a custom target needs file = "path.jsonl"')
            for k in sorted(unknown):
                bad(f"data.targets.{name}.{k}", f"unknown key{closest(k, list(TARGET_KEYS))}")
        else:
            bad(f"data.targets.{name}", f"expected a built-in name or a table, got {spec!r}")


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None, path: Path | None = None) -> Config:
    """Builds and validates a Config from a parsed TOML dict plus `{"section.key": value}` overrides."""
    where = f"{path}: " if path else ""
    problems: list[str] = []
    hints = typing.get_type_hints(Config)
    sections: dict[str, dict[str, Any]] = {}
    for sec_name, sec_val in raw.items():
        if sec_name not in SECTIONS:
            problems.append(f"{where}unknown section [{sec_name}]{closest(sec_name, list(SECTIONS))}")
            continue
        if not isinstance(sec_val, dict):
            problems.append(f"{where}{sec_name}: expected a table [{sec_name}]")
            continue
        sections[sec_name] = dict(sec_val)
    given = {k for k, v in (overrides or {}).items() if v is not None}  # keys set by command-line options

    def label(key: str) -> str:
        return f"{option_name(key)} sets {key}" if key in given else f"{where}{key}"

    for key in sorted(given):
        sec_name, _, fname = key.partition(".")
        if sec_name not in SECTIONS:  # else the override would be dropped silently
            problems.append(f"unknown key {key}{closest(sec_name, list(SECTIONS))}")
            continue
        sections.setdefault(sec_name, {})[fname] = overrides[key]

    built: dict[str, Any] = {}
    for sec_name in SECTIONS:
        cls = hints[sec_name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ftypes = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for k, v in sections.get(sec_name, {}).items():
            if k not in fields:
                problems.append(f"{where}unknown key {sec_name}.{k}{closest(k, list(fields))}")
                continue
            kwargs[k] = _check_type(label(f"{sec_name}.{k}"), v, ftypes[k], problems)
        try:
            built[sec_name] = cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the checks above
            problems.append(f"{where}[{sec_name}]: {exc}")
            built[sec_name] = cls()
    cfg = Config(**built, path=path, given=frozenset(sections))
    if not problems:
        _validate_values(cfg, label, problems)
        problems += study_problems(cfg.study, cfg.warmup.epochs, label)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def find_config(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        p = d / CONFIG_NAME
        if p.is_file():
            return p
    return None


def read_toml(path: Path) -> dict[str, Any]:
    from lessctl.files import decode_utf8

    if Path(path).is_dir():
        raise ConfigError(f"--config: {path} is a folder; give the workspace file, e.g. {Path(path) / CONFIG_NAME}")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such workspace file; create one with `lessctl init`") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return tomllib.loads(decode_utf8(data, path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None, required: bool = True) -> Config:
    """Finds (or takes) the workspace file, reads it and applies the overrides."""
    if path is None:
        path = find_config()
        if path is None:
            if required:
                raise ConfigError(
                    f"no {CONFIG_NAME} in {Path.cwd()} or its parents; create one with "
                    "`lessctl init --preset tiny` or pass --config PATH"
                )
            return build_config({}, overrides, None)
    path = Path(path).resolve()
    return build_config(read_toml(path), overrides, path)


def describe_fields() -> dict[str, dict[str, str]]:
    """{section: {key: one-line doc}}: for `lessctl config show --docs` and the README."""
    hints = typing.get_type_hints(Config)
    return {sec: {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(hints[sec])} for sec in SECTIONS}


def to_toml(d: dict[str, Any]) -> str:
    """A small TOML writer for the value types the config uses."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{_key(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []
    for sec, body in d.items():
        lines.append(f"[{sec}]")
        for k, v in body.items():
            lines.append(f"{_key(k)} = {val(v)}")
        lines.append("")
    return "\n".join(lines)


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else '"' + k + '"'
