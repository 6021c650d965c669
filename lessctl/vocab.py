"""Every closed set of names lessctl knows, defined once.

Config validation, the commands' checks, their help texts and shell completion all read these
tuples; the `Literal` types beside them are for signatures. A new method, stage or target is added
here first. `closest` and `type_problem` word the errors about a name or value outside them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Literal, get_args

Method = Literal["less", "random", "bm25", "rds", "dsir"]
METHODS: tuple[str, ...] = get_args(Method)
"""Selection methods of `lessctl match --method`."""

CHECKPOINT_METHODS: tuple[str, ...] = ("less",)
"""Methods whose scores are built from warmup checkpoints (so `ablate` applies to them)."""

GradType = Literal["adam", "sgd", "sign"]
GRAD_TYPES: tuple[str, ...] = get_args(GradType)
"""Gradient features: adam (LESS's pool features), sgd (its target features), sign."""

REPS = "reps"
FEATURE_TYPES: tuple[str, ...] = GRAD_TYPES + (REPS,)
"""What a store may hold (`lessctl grads --type`): a gradient feature, or reps (RDS's representations: the last
layer's hidden state at each example's last token, unprojected)."""

REPS_METHODS: tuple[str, ...] = ("rds",)
"""Methods that match on reps stores: the grads stage of `run` and `slurm submit` computes `--type reps` for them."""


ProjectorKind = Literal["auto", "cuda", "basic", "sketch"]
PROJECTOR_KINDS: tuple[str, ...] = get_args(ProjectorKind)

CudaEngine = Literal["auto", "triton", "fast_jl"]
CUDA_ENGINES: tuple[str, ...] = get_args(CudaEngine)
"""What computes TRAK's CUDA projection: lessctl's Triton kernel or fast_jl."""

Stage = Literal["warmup", "grads", "match", "finetune", "eval"]
STAGES: tuple[str, ...] = get_args(Stage)
"""The pipeline's stages in order (`lessctl run`, `lessctl slurm submit`)."""

GRADIENT_METHODS: tuple[str, ...] = CHECKPOINT_METHODS + REPS_METHODS
"""Methods that need the warmup and the grads stage; the others read the training text alone."""

STUDY_METHODS: tuple[str, ...] = ("less", "random", "bm25", "dsir", "rds")
"""The study's default comparison (`[study] methods`): every method, in the order of the paper's table."""

SLURM_STAGES: tuple[str, ...] = STAGES + ("ir", "ablate", "run", "demo")
"""Commands `lessctl slurm render` has settings for."""

BuiltinTarget = Literal["mmlu", "bbh", "tydiqa"]
BUILTIN_TARGETS: tuple[str, ...] = get_args(BuiltinTarget)
"""Built-in target tasks; each is also an evaluation task."""

EVAL_TASKS: tuple[str, ...] = BUILTIN_TARGETS

ChatFormat = Literal["tulu", "llama2"]
CHAT_FORMATS: tuple[str, ...] = get_args(ChatFormat)
"""Chat formats of training data (`[model] chat_format`)."""

LossWeighting = Literal["example", "token"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
"""How warmup and finetune weigh examples in the loss: example (LESS's, every example the same) or token."""

StepStream = Literal["less", "epoch"]
STEP_STREAMS: tuple[str, ...] = get_args(StepStream)
"""How optimizer steps take the epochs' examples: less (transformers 4.36's: a step may straddle two epochs)
or epoch (transformers 5's: every epoch ends with a step)."""

PROMPT_FORMATS: tuple[str, ...] = CHAT_FORMATS + ("plain",)
"""Formats of target and evaluation prompts: a chat format, or plain text."""

PRESETS: tuple[str, ...] = ("tiny", "llama2-7b", "llama2-13b", "mistral-7b")
EXTRA_PRESETS: tuple[str, ...] = ("tiny-ir",)
"""Workspace presets of `lessctl init`; the extra ones need --data-dir."""

KV_CACHES: tuple[str, ...] = ("auto", "static", "dynamic")
"""Generation's KV cache (`[eval] kv_cache`): auto is static on a GPU, dynamic on the CPU."""

DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
"""`[model] dtype` values."""


def spelled(options: tuple[str, ...] | list[str]) -> str:
    """Options as a sentence lists them: "a, b or c"."""
    options = list(options)
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


_TYPE_WORDS = {
    float: "a number",
    int: "an integer",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def type_problem(key: str, value: Any, typ: Any) -> str | None:
    """The problem with a value of key `key` that should be of type `typ` (a type or its name), or None.

    Numbers accept integers, integers refuse booleans; types other than those of TOML pass unchecked.
    """
    typ = {t.__name__: t for t in _TYPE_WORDS}.get(typ, typ)
    if typ not in _TYPE_WORDS:
        return None
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, typ)
    return None if ok else f"{key}: expected {_TYPE_WORDS[typ]}, got {value!r}"


def closest(name: str, options: Iterable[str], list_all: bool = True) -> str:
    """A suffix for an error about an unknown `name`: the closest option, else all of them (or nothing)."""
    options = list(options)
    m = difflib.get_close_matches(name, options, n=1)
    if m:
        return f" (did you mean '{m[0]}'?)"
    return f" (valid: {', '.join(options)})" if list_all else ""


DATA_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".parquet")
"""Training and target data files: jsonl, gzip-compressed jsonl, parquet (as the Hugging Face hub exports data sets).
A name ending in `.parquet` is read as parquet, one ending in `.gz` as gzip-compressed jsonl, any other as jsonl."""


SEED_MAX = 2**32 - 1  # numpy's seeds are 0 .. 2**32 - 1


def seed_problem(seed) -> str | None:
    """Why `seed` is not a seed (None when it is): an integer from 0 to SEED_MAX."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
        return None
    return f"a seed is an integer from 0 to {SEED_MAX}, got {seed!r}"
