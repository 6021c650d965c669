"""Warmup and finetune: one LoRA training loop (transformers Trainer + peft) and the checkpoint manifest.

Warmup saves a checkpoint (adapter, optimizer state, trainer state) at the end of every epoch and
writes `warmup/checkpoints.json` = [{"step", "epoch", "lr_mean"}], where lr_mean is the mean of the
learning rates the optimizer actually used in that epoch's steps (LESS's checkpoint weights).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lessctl import __version__, paths
from lessctl.config import Config, TrainConfig
from lessctl.errors import AlreadyExistsError, ConfigError, InputError, MissingArtifactError
from lessctl.files import replace_dir, sha256_file, write_atomic

log = logging.getLogger(__name__)

LR_FILE = "lessctl_lrs.json"  # per-step learning rates so far, saved in every checkpoint
LOG_FILE = "log_history.jsonl"  # loss, learning rate, ... of every logged step, in the run folder
MANIFEST = paths.CHECKPOINTS_FILE
RUN_FILE = "lessctl_run.json"


@dataclass
class TrainResult:
    output_dir: Path
    checkpoints: list[dict]
    counts: dict
    seconds: float
    resumed_from: str | None = None
    plan: dict | None = None  # training_plan(): steps per epoch, checkpoints, batch
    truncation: dict | None = None  # what max_seq_length cut (lessctl.data.encoding.TruncationReport.to_dict)


def warmup_dir(cfg: Config) -> Path:
    return paths.warmup_dir(cfg.output_dir)


def checkpoints_path(cfg: Config) -> Path:
    return warmup_dir(cfg) / MANIFEST


def read_checkpoints(cfg: Config) -> list[dict]:
    """The manifest written by warmup; a user error naming `lessctl warmup` when it is missing or damaged."""
    p = checkpoints_path(cfg)
    if not p.is_file():
        raise MissingArtifactError(
            f"no warmup checkpoints in {warmup_dir(cfg)} ({MANIFEST} missing); run `lessctl warmup` first"
        )
    redo = "run `lessctl warmup --force` to train the warmup again"
    try:
        entries = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {e.start}); {redo}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); {redo}") from None
    ok = isinstance(entries, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("step"), int)
        and isinstance(c.get("lr_mean"), (int, float))
        and math.isfinite(c["lr_mean"])
        for c in entries
    )
    if not ok:
        raise InputError(f'{p}: expected a list of {{"step": int, "epoch", "lr_mean": number}}; {redo}')
    return entries


def checkpoint_dir(cfg: Config, step: int) -> Path:
    return paths.checkpoint_dir(cfg.output_dir, step)


def _complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders whose save finished (our LR file is written after the Trainer's files)."""
    found = []
    for d in out.glob("checkpoint-*"):
        if d.is_dir() and (d / LR_FILE).is_file() and (d / "trainer_state.json").is_file():
            try:
                found.append((int(d.name.split("-")[1]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def _lr_callback(history: list[float], output_dir: Path):
    from transformers import TrainerCallback

    class LearningRateRecorder(TrainerCallback):
        """Records the learning rate of each optimizer step and saves the history with each checkpoint."""

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if optimizer is not None:
                history.append(float(optimizer.param_groups[0]["lr"]))

        def on_save(self, args, state, control, **kw):
            d = output_dir / f"checkpoint-{state.global_step}"
            if d.is_dir():
                write_atomic(d / LR_FILE, json.dumps({"lrs": history[: state.global_step], "epoch": state.epoch}))

    return LearningRateRecorder()


def _stop_after_callback(n_saves: int):
    """Test hook (LESSCTL_TEST_EXIT_AFTER_SAVES): hard-exits the process after n checkpoint saves."""
    from transformers import TrainerCallback

    class ExitAfterSaves(TrainerCallback):
        seen = 0

        def on_save(self, args, state, control, **kw):
            self.seen += 1
            if self.seen >= n_saves:
                os._exit(17)

    return ExitAfterSaves()


class _ListDataset:
    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}


def world_size() -> int:
    """Processes training together: WORLD_SIZE as torchrun and accelerate set it, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def accumulation_steps(tcfg: TrainConfig, section: str, n_devices: int) -> int:
    """Forward passes per optimizer step: effective_batch_size / (batch_size x devices) when that is set
    (an error naming the key when it does not divide), else gradient_accumulation_steps."""
    if not tcfg.effective_batch_size:
        return tcfg.gradient_accumulation_steps
    per_pass = tcfg.batch_size * n_devices
    if tcfg.effective_batch_size % per_pass:
        raise ConfigError(
            f"[{section}] effective_batch_size = {tcfg.effective_batch_size} is not a multiple of batch_size "
            f"{tcfg.batch_size} x {n_devices} device(s) = {per_pass}"
        )
    return tcfg.effective_batch_size // per_pass


def training_plan(n_examples: int, tcfg: TrainConfig, accumulation: int, n_devices: int, save_each_epoch: bool):
    """Optimizer steps per epoch as transformers 5's Trainer counts them (each device gets ceil(N / devices)
    examples, in ceil(. / batch_size) passes; an epoch's last step takes the passes left), and the
    checkpoints warmup writes."""
    passes = math.ceil(math.ceil(n_examples / n_devices) / tcfg.batch_size)
    per_epoch = max(1, math.ceil(passes / accumulation))
    return {
        "examples": n_examples,
        "devices": n_devices,
        "batch_size": tcfg.batch_size,
        "gradient_accumulation_steps": accumulation,
        "examples_per_step": tcfg.batch_size * accumulation * n_devices,
        "steps_per_epoch": per_epoch,
        "epochs": tcfg.epochs,
        "checkpoints": [per_epoch * (e + 1) for e in range(tcfg.epochs)] if save_each_epoch else [],
        "loss_weighting": tcfg.loss_weighting,
    }


def _precision(cfg: Config, tcfg: TrainConfig, device: str) -> tuple[str, Any]:
    """(the dtype the base model is loaded in, the autocast dtype or None)."""
    import torch

    from lessctl.models import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, device)
    if tcfg.autocast:
        return "fp32", (dtype if dtype != torch.float32 else None)
    return cfg.model.dtype, (torch.bfloat16 if dtype == torch.bfloat16 else None)


def _training_args(cfg: Config, tcfg: TrainConfig, out: Path, device: str, save_each_epoch: bool, accumulation: int):
    import torch
    from transformers import TrainingArguments

    _, amp = _precision(cfg, tcfg, device)
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=tcfg.epochs,
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=tcfg.weight_decay,
        optim="adamw_torch",
        bf16=amp == torch.bfloat16,
        fp16=amp == torch.float16,
        save_strategy="epoch" if save_each_epoch else "no",
        save_only_model=False,
        logging_steps=tcfg.logging_steps,
        report_to=list(tcfg.report_to),
        seed=tcfg.seed,
        data_seed=tcfg.data_seed,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainer_class(loss_weighting: str):
    """The Trainer for a loss weighting: transformers' own for "token" (summed token losses of an optimizer
    step / its label tokens); for "example", transformers 4.36's loss as LESS trained with it: each
    example's mean token loss, averaged over the examples of the optimizer step, so every example weighs
    the same (with batch 1 x 32 accumulation: mean loss / 32, exactly 4.36's)."""
    from transformers import Trainer

    if loss_weighting == "token":
        return Trainer

    from lessctl.models import per_example_loss

    class ExampleWeightedTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss divides by the examples of the whole optimizer step

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, sum(int(b["labels"].shape[0]) for b in batches)  # examples in this step, this device

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            per_example, _ = per_example_loss(outputs.logits, labels)
            n = num_items_in_batch or labels.shape[0] * self.current_gradient_accumulation_steps
            loss = per_example.sum() / n
            return (loss, outputs) if return_outputs else loss

    return ExampleWeightedTrainer


def train_lora(
    cfg: Config,
    tcfg: TrainConfig,
    train_files: dict[str, Path],
    out: Path,
    *,
    base_model: str | None = None,
    save_each_epoch: bool,
    resume: bool = True,
    device: str | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Trains a fresh LoRA on the seeded `tcfg.percentage` subset of `train_files` into `out`."""
    import torch
    from transformers import DataCollatorForSeq2Seq, TrainerCallback, set_seed

    from lessctl.data.pool import encode_training_set
    from lessctl.models import add_lora, default_device, load_base_model, load_tokenizer

    device = device or default_device()
    section = "warmup" if tcfg is cfg.warmup else "finetune"
    n_devices = world_size()
    accumulation = accumulation_steps(tcfg, section, n_devices)
    t0 = time.time()
    base = cfg.model_ref(base_model)
    tok = load_tokenizer(base)
    set_seed(tcfg.seed)
    examples, counts, truncation = encode_training_set(
        train_files, tok, cfg.model.max_seq_length, cfg.model.chat_format, tcfg.percentage, tcfg.sample_data_seed
    )
    if not examples:
        raise InputError("no training example has trainable tokens; check the data files and max_seq_length")
    if counts["subset"] < counts["pool"]:
        torch.manual_seed(tcfg.sample_data_seed)  # LESS draws the subset under temp_seed, which leaves torch so seeded
    load_dtype, _ = _precision(cfg, tcfg, device)
    model = load_base_model(base, load_dtype, device, tokenizer=tok)
    model = add_lora(model, cfg.lora)
    out.mkdir(parents=True, exist_ok=True)
    plan = training_plan(len(examples), tcfg, accumulation, n_devices, save_each_epoch)

    resume_from = None
    history: list[float] = []
    if resume and save_each_epoch:
        done = _complete_checkpoints(out)
        if done:
            resume_from = done[-1]
            history = list(json.loads((resume_from / LR_FILE).read_text())["lrs"])
            log.info("resuming from %s", resume_from)

    callbacks: list[Any] = [_lr_callback(history, out)]

    class _Log(TrainerCallback):  # every logged step into <run>/log_history.jsonl (a resumed run appends)
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                rec = {"step": state.global_step, "max_steps": state.max_steps, **logs}
                with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if on_log is not None:
                    on_log(rec)

    callbacks.append(_Log())
    stop_after = os.environ.get("LESSCTL_TEST_EXIT_AFTER_SAVES")
    if stop_after:
        callbacks.append(_stop_after_callback(int(stop_after)))

    if on_log is not None:
        on_log({"step": 0, "max_steps": plan["steps_per_epoch"] * plan["epochs"], "plan": plan})
    trainer = trainer_class(tcfg.loss_weighting)(
        model=model,
        args=_training_args(cfg, tcfg, out, device, save_each_epoch, accumulation),
        train_dataset=_ListDataset(examples),
        data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # logs go to our progress bar, never to stdout
    trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    checkpoints: list[dict] = []
    if save_each_epoch:
        checkpoints = _manifest(out, history)
    else:
        trainer.save_model(str(out))
        tok.save_pretrained(str(out))
    resumed = str(resume_from) if resume_from else None
    return TrainResult(out, checkpoints, counts, time.time() - t0, resumed, plan, truncation.to_dict())


def _manifest(out: Path, history: list[float]) -> list[dict]:
    """[{"step", "epoch", "lr_mean", "path"}] from the saved checkpoints and the recorded learning rates."""
    entries = []
    prev = 0
    for d in _complete_checkpoints(out):
        step = int(d.name.split("-")[1])
        state = json.loads((d / "trainer_state.json").read_text())
        lrs = history[prev:step]
        if not lrs:
            continue
        entries.append(
            {
                "step": step,
                "epoch": int(round(state.get("epoch", len(entries) + 1))),
                "lr_mean": sum(lrs) / len(lrs),
                "path": d.name,
            }
        )
        prev = step
    return entries


def run_warmup(cfg: Config, *, force: bool = False, device: str | None = None, on_log=None) -> TrainResult:
    """`lessctl warmup`: LoRA on the warmup subset, a checkpoint per epoch, then checkpoints.json.

    Without force an interrupted warmup resumes in place. With force the new warmup is trained in
    `warmup.new/` and replaces `warmup/` only once it is complete: a failure (a bad data line, a device
    torch cannot use, Ctrl-C) leaves the old warmup as it was.
    """
    from lessctl.models import resolve_device

    device = resolve_device(device)
    out = warmup_dir(cfg)
    files = cfg.train_files()
    if not files:
        raise InputError(
            f"{cfg.path or 'config'}: [data] train is empty; add training files, e.g. train = {{dolly = "
            f"\"dolly.jsonl\"}}"
        )
    if (out / MANIFEST).is_file() and not force:
        raise AlreadyExistsError(f"warmup is already complete in {out}; pass --force to train it again")
    if not (force and out.exists()):
        return _warmup_into(cfg, files, out, device, on_log)
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        res = _warmup_into(cfg, files, staging, device, on_log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out)
    res.output_dir = out
    return res


def _warmup_into(cfg: Config, files: dict[str, Path], out: Path, device: str, on_log) -> TrainResult:
    res = train_lora(cfg, cfg.warmup, files, out, save_each_epoch=True, device=device, on_log=on_log)
    write_atomic(out / MANIFEST, json.dumps(res.checkpoints, indent=2))
    run = {"kind": "warmup", "run_id": uuid.uuid4().hex, "counts": res.counts, "seconds": res.seconds}
    run["truncation"] = res.truncation
    _write_run_file(out, cfg, run)
    return res


def warmup_run_id(cfg: Config) -> str | None:
    """The id of the warmup run whose checkpoints are in warmup/ (stores record it); None before ids existed."""
    try:
        return json.loads((warmup_dir(cfg) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def run_finetune(
    cfg: Config,
    train_file: Path,
    name: str,
    *,
    base_model: str | None = None,
    meta: dict | None = None,
    force: bool = False,
    device: str | None = None,
    on_log=None,
) -> TrainResult:
    """`lessctl finetune`: a fresh LoRA on `train_file` (all of it by default) into finetune/<name>/.

    The adapter is trained in `<name>.new/` and moved into place when complete, so a failed or interrupted
    run (`--force` included) leaves an existing adapter as it was.
    """
    from lessctl.models import resolve_device

    device = resolve_device(device)
    if not name or "/" in name or name in (".", "..") or name.endswith(".new"):
        raise ConfigError(f"--name: {name!r} is not a folder name (no '/', not '.', '..' or ending in .new)")
    out = paths.finetune_dir(cfg.output_dir, name)
    if (out / "adapter_config.json").is_file() and not force:
        raise AlreadyExistsError(f"{out} already holds a finetuned adapter; pass --force to train it again")
    if not Path(train_file).is_file():
        raise MissingArtifactError(f"{train_file}: no such training file")
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        res = _finetune_into(cfg, Path(train_file), staging, base_model, meta, device, on_log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out)
    res.output_dir = out
    return res


def _finetune_into(cfg: Config, train_file: Path, out: Path, base_model, meta, device, on_log) -> TrainResult:
    res = train_lora(
        cfg,
        cfg.finetune,
        {Path(train_file).stem: Path(train_file)},
        out,
        base_model=base_model,
        save_each_epoch=False,
        resume=False,
        device=device,
        on_log=on_log,
    )
    base, selector = cfg.model_ref(base_model), cfg.model_ref()
    _write_run_file(
        out,
        cfg,
        {
            "kind": "finetune",
            "train_file": str(train_file),
            "train_file_sha256": sha256_file(train_file),
            "base_model": base,
            "selection_model": selector,
            "transfer": base != selector,
            "counts": res.counts,
            "truncation": res.truncation,
            "seconds": res.seconds,
            **(meta or {}),
        },
    )
    return res


def _write_run_file(out: Path, cfg: Config, extra: dict) -> None:
    rec = {"lessctl_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra, "config": cfg.to_dict()}
    write_atomic(out / RUN_FILE, json.dumps(rec, indent=2, default=str))


def adapter_is_stale(adapter_dir: Path, train_file: Path) -> bool:
    """True when `train_file` (a selection) is not the file the adapter in `adapter_dir` was trained on:
    its sha256 differs from the recorded one (runs without the record: the file is newer than the run)."""
    run = Path(adapter_dir) / RUN_FILE
    try:
        recorded = json.loads(run.read_text()).get("train_file_sha256")
    except (OSError, ValueError):
        return True
    if recorded:
        return recorded != sha256_file(train_file)
    return Path(train_file).stat().st_mtime > run.stat().st_mtime
