"""Loading base models, LoRA adapters and tokenizers the way users load them (transformers + peft)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lessctl.errors import ConfigError, InputError, MissingArtifactError
from lessctl.outputs.artifacts import is_adapter_dir  # noqa: F401 (the loaders' check, re-exported)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def quiet_hf() -> None:
    """Keeps transformers' own progress bars and a peft deprecation warning off our stderr (we draw our own)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def resolve_device(device: str | None, option: str = "--device") -> str:
    """`device` checked against what this torch can use (None: the default device); a ConfigError naming
    `option` for a name torch does not know or a device it cannot reach."""
    if device is None:
        return default_device()
    import torch

    text = str(device).strip()
    m = _DEVICE_RE.fullmatch(text)
    if m is None or (m[1] != "cuda" and m[2] is not None):
        raise ConfigError(f"{option}: unknown device {device!r}; expected cpu, cuda or cuda:N")
    if m[1] == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(
                f"{option}: {text} is not available: torch {torch.__version__} ({build}) sees no GPU; use --device cpu"
            )
        n = torch.cuda.device_count()
        if m[2] is not None and int(m[2]) >= n:
            raise ConfigError(f"{option}: {text} does not exist; this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    if m[1] == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}: mps is not available here; use --device cpu")
    return text


def resolve_dtype(name: str, device: str | None = None):
    """'auto' is bf16 on a GPU that supports it and fp32 elsewhere."""
    import torch

    device = resolve_device(device)
    if name == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _load_error(what: str, name: str, exc: Exception) -> ConfigError:
    local = Path(name).expanduser()
    if local.exists():
        return ConfigError(f"cannot load {what} from {local}: {exc}".splitlines()[0])
    return ConfigError(
        f"cannot load {what} {name!r}: it is not a local folder and not in the Hugging Face cache "
        "(set [model] name_or_path to a downloaded model folder, or download it first with network access)"
    )


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer, with a pad token added when it has none (as LESS does)."""
    from transformers import AutoTokenizer

    quiet_hf()
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as exc:
        raise _load_error("the tokenizer", str(name_or_path), exc) from None
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_base_model(name_or_path: str | Path, dtype: str = "auto", device: str | None = None, tokenizer: Any = None):
    """A causal LM on `device`, embeddings resized when the tokenizer gained tokens."""
    from transformers import AutoModelForCausalLM

    quiet_hf()
    device = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as exc:
        raise _load_error("the model", str(name_or_path), exc) from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model.to(device)


def add_lora(model: Any, lora_cfg: Any):
    """Wraps a base model with a fresh LoRA adapter (peft) per the [lora] config."""
    from peft import LoraConfig, TaskType, get_peft_model

    pcfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        inference_mode=False,
    )
    return get_peft_model(model, pcfg)


def adapter_base(adapter_dir: str | Path) -> str:
    from lessctl.files import read_json_file

    path = Path(adapter_dir) / ADAPTER_CONFIG
    cfg = read_json_file(path, "a PEFT adapter config (a JSON object)", "train the adapter again with --force")
    base = cfg.get("base_model_name_or_path") or ""
    if not isinstance(base, str):
        raise InputError(f"{path}: base_model_name_or_path is not a path ({base!r}); train the adapter again")
    return base


def load_adapter_model(
    adapter_dir: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trainable: bool = False,
):
    """Base model + the LoRA adapter saved in `adapter_dir` (a checkpoint or a finetune folder).

    Returns (model, tokenizer). The tokenizer is the adapter folder's when it saved one.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise MissingArtifactError(f"{adapter_dir}: no LoRA adapter here ({ADAPTER_CONFIG} missing)")
    base = base or adapter_base(adapter_dir)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    tok = load_tokenizer(tok_src)
    model = load_base_model(base, dtype, device, tokenizer=tok)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign adapter file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{adapter_dir}: the LoRA adapter cannot be loaded ({first})") from None
    return model.to(resolve_device(device)), tok


def load_model_for_eval(path: str | Path, dtype: str = "auto", device: str | None = None):
    """A base model folder, or an adapter folder whose base is loaded and the adapter merged in.

    Returns (model, tokenizer) in eval mode, the tokenizer padding on the left for generation.
    """
    device = resolve_device(device)
    if is_adapter_dir(path):
        model, tok = load_adapter_model(path, dtype=dtype, device=device)
        model = model.merge_and_unload()
    else:
        tok = load_tokenizer(path)
        model = load_base_model(path, dtype, device, tokenizer=tok)
    tok.padding_side = "left"
    model.eval()
    return model, tok


def per_example_loss(logits, labels):
    """Mean next-token cross-entropy over each example's label tokens, and their counts: ([B], [B]) (0 where none).

    The loss LESS takes per example: its gradients are the features (`grads.engine`), and the training
    stages weigh examples by it (`training`)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    count = (shift_labels != -100).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count
