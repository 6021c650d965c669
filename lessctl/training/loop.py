"""The LoRA training loop warmup and finetune share: the Trainer's arguments, the optimizer-step plan,
the learning-rate record and resume from the last complete checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lessctl.config import Config, TrainConfig
from lessctl.distributed import world_size
from lessctl.errors import ConfigError, InputError
from lessctl.files import torch_load_safe, write_atomic
from lessctl.outputs import layout as paths
from lessctl.training import varlen as attention
from lessctl.training.trainers import PackingCollator, trainer_class

log = logging.getLogger(__name__)

LR_FILE = "lessctl_lrs.json"  # per-step learning rates so far, saved in every checkpoint
LOG_FILE = "log_history.jsonl"  # loss, learning rate, ... of every logged step, in the run folder
MANIFEST = paths.CHECKPOINTS_FILE
RUN_FILE = paths.RUN_FILE


@dataclass
class TrainResult:
    output_dir: Path
    checkpoints: list[dict]
    counts: dict
    seconds: float
    resumed_from: str | None = None
    plan: dict | None = None  # training_plan(): steps per epoch, checkpoints, batch
    truncation: dict | None = None  # what max_seq_length cut (lessctl.data.encoding.TruncationReport.to_dict)


def _complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders whose save finished (our LR file is written after the Trainer's files)."""
    found = []
    for d in out.glob(paths.CHECKPOINT_PREFIX + "*"):
        step = paths.checkpoint_step(d)
        if step is not None and d.is_dir() and (d / LR_FILE).is_file() and (d / "trainer_state.json").is_file():
            found.append((step, d))
    return [d for _, d in sorted(found)]


def _check_resumable(ckpt: Path) -> list[float]:
    """The recorded learning rates of the checkpoint a warmup resumes from, once every file the Trainer will load
    from it has been read as it will be (torch files with weights_only=True): a damaged or hostile file is an
    InputError naming it, before training starts."""
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    redo = f"delete {ckpt} to resume from the checkpoint before it, or `lessctl warmup --force` to start again"
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
        if (ckpt / name).is_file():
            torch_load_safe(ckpt / name, "a Trainer checkpoint file", redo)
    for rng in sorted(ckpt.glob("rng_state*.pth")):
        with safe_globals():  # numpy's random state, as the Trainer allows it
            torch_load_safe(rng, "a Trainer random state", redo)
    for weights in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - safetensors' errors have no common type
            raise InputError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]}); {redo}") from None
    for name in ("trainer_state.json", LR_FILE):
        try:
            data = json.loads((ckpt / name).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"{ckpt / name}: cannot be read as JSON ({e}); {redo}") from None
        if name == LR_FILE:
            lrs = data.get("lrs") if isinstance(data, dict) else None
            if not isinstance(lrs, list) or not all(isinstance(x, (int, float)) for x in lrs):
                raise InputError(f'{ckpt / name}: expected {{"lrs": [numbers]}}; {redo}')
            history = [float(x) for x in lrs]
    return history


def _lr_callback(history: list[float], output_dir: Path):
    from transformers import TrainerCallback

    class LearningRateRecorder(TrainerCallback):
        """Records the learning rate of each optimizer step and saves the history with each checkpoint."""

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if optimizer is not None:
                history.append(float(optimizer.param_groups[0]["lr"]))

        def on_save(self, args, state, control, **kw):
            d = paths.checkpoint_dir_in(output_dir, state.global_step)
            if state.is_world_process_zero and d.is_dir():  # the checkpoint is rank 0's too
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
    """The optimizer-step plan: examples per step, steps, and the checkpoints warmup writes.

    step_stream "less" (transformers 4.36's, which LESS ran): the epochs' examples form one stream taken
    `examples_per_step` at a time, so a step may straddle two epochs; max_steps = epochs x floor(examples /
    examples_per_step), and a checkpoint where each epoch's examples end (floor(e x examples / per step),
    the last at max_steps): 105, 211, 317, 420 for 13,533 examples at 128. "epoch" (transformers 5's): each
    device gets ceil(N / devices) examples in ceil(. / batch_size) passes and an epoch's last step takes the
    passes left. A pool smaller than one step trains one step an epoch either way."""
    per_step = tcfg.batch_size * accumulation * n_devices
    stream = tcfg.step_stream == "less" and n_examples >= per_step
    if stream:
        per_epoch = n_examples // per_step
        max_steps = per_epoch * tcfg.epochs
        ends = [min(max_steps, (e + 1) * n_examples // per_step) for e in range(tcfg.epochs)]
    else:
        passes = math.ceil(math.ceil(n_examples / n_devices) / tcfg.batch_size)
        per_epoch = max(1, math.ceil(passes / accumulation))
        max_steps = per_epoch * tcfg.epochs
        ends = [per_epoch * (e + 1) for e in range(tcfg.epochs)]
    return {
        "examples": n_examples,
        "devices": n_devices,
        "batch_size": tcfg.batch_size,
        "gradient_accumulation_steps": accumulation,
        "examples_per_step": per_step,
        "step_stream": "less" if stream else "epoch",
        "steps_per_epoch": per_epoch,
        "max_steps": max_steps,
        "epochs": tcfg.epochs,
        "checkpoints": sorted(set(ends)) if save_each_epoch else [],
        "loss_weighting": tcfg.loss_weighting,
        "pack_tokens": tcfg.pack_tokens if tcfg.packing else 0,
    }


def data_order_seed(tcfg: TrainConfig) -> int:
    """The seed of the data order: data_seed, or (-1, the default) the Trainer's seed, as transformers 4.36 drew it."""
    return tcfg.seed if tcfg.data_seed < 0 else tcfg.data_seed


def step_stream_order(n_examples: int, plan: dict, seed: int) -> list[int]:
    """The example indices of a "less" plan's steps, end to end (step s = entries [s x per_step, (s+1) x per_step)):
    each epoch a RandomSampler permutation from one generator seeded with `seed` (the sampler transformers 4.36's
    Trainer drew every epoch from), the epochs concatenated, cut after max_steps steps."""
    import torch
    from torch.utils.data import RandomSampler

    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = RandomSampler(range(n_examples), generator=generator)
    need = plan["max_steps"] * plan["examples_per_step"]
    order: list[int] = []
    while len(order) < need:
        order += list(sampler)
    return order[:need]


def _stream_callback(plan: dict, save_each_epoch: bool):
    """For a "less" plan (one Trainer epoch over the whole stream): the epoch count of the examples taken so
    far in the Trainer's state (exactly e where the e-th epoch's examples end), and a checkpoint there."""
    from transformers import TrainerCallback

    ends: dict[int, int] = {}
    for e in range(plan["epochs"]):
        ends.setdefault(min(plan["max_steps"], (e + 1) * plan["examples"] // plan["examples_per_step"]), e + 1)

    class StreamEpochs(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in ends:
                state.epoch = float(ends[state.global_step])
                control.should_save = save_each_epoch
            else:
                state.epoch = state.global_step * plan["examples_per_step"] / plan["examples"]

    return StreamEpochs()


def _precision(cfg: Config, tcfg: TrainConfig, device: str) -> tuple[str, Any]:
    """(the dtype the base model is loaded in, the autocast dtype or None)."""
    import torch

    from lessctl.models import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, device)
    if tcfg.autocast:
        return "fp32", (dtype if dtype != torch.float32 else None)
    return cfg.model.dtype, (torch.bfloat16 if dtype == torch.bfloat16 else None)


def _training_args(
    cfg: Config,
    tcfg: TrainConfig,
    out: Path,
    device: str,
    save_each_epoch: bool,
    accumulation: int,
    plan: dict | None = None,
):
    """The Trainer's arguments; a "less" plan runs as one Trainer epoch of plan["max_steps"] steps over its
    stream, saved where the plan's epochs end (`_stream_callback`)."""
    import torch
    from transformers import TrainingArguments

    _, amp = _precision(cfg, tcfg, device)
    stream = plan is not None and plan["step_stream"] == "less"
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=tcfg.epochs,
        max_steps=plan["max_steps"] if stream else -1,
        # packing: one batch holds the step's examples (the same ones the batch-of-one passes would take)
        per_device_train_batch_size=tcfg.batch_size * (accumulation if tcfg.packing else 1),
        gradient_accumulation_steps=1 if tcfg.packing else accumulation,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=tcfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=tcfg.weight_decay,
        optim="adamw_torch",
        bf16=amp == torch.bfloat16,
        fp16=amp == torch.float16,
        save_strategy="epoch" if save_each_epoch and not stream else "no",
        save_only_model=False,
        logging_steps=tcfg.logging_steps,
        report_to=list(tcfg.report_to),
        seed=tcfg.seed,
        data_seed=data_order_seed(tcfg),
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


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


def build_trainer(
    cfg,
    tcfg,
    model,
    tok,
    examples,
    out: Path,
    device: str,
    save_each_epoch: bool,
    accumulation: int,
    callbacks,
    plan: dict | None = None,
):
    """The Trainer over `examples` (each with input_ids and labels): packed passes when tcfg.packing, else
    batches of tcfg.batch_size padded by the tokenizer; logs go to the callbacks, never to stdout.
    A "less" plan: the Trainer reads `step_stream_order`'s stream in order (a sequential sampler), so every
    optimizer step takes the stream's next examples_per_step examples, on any number of devices."""
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if tcfg.packing:  # one batch = the step's examples on this device, packed (training.trainers)
        collator: Any = PackingCollator(tcfg.pack_tokens)
    else:
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    varlen = tcfg.packing and model.config._attn_implementation == attention.NAME
    cls = trainer_class(tcfg.loss_weighting, tcfg.packing, varlen)
    dataset = _ListDataset(examples)
    if plan is not None and plan["step_stream"] == "less":

        class StreamTrainer(cls):  # type: ignore[misc, valid-type]
            def _get_train_sampler(self, train_dataset=None):
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        cls = StreamTrainer
        dataset = _ListDataset([examples[i] for i in step_stream_order(len(examples), plan, data_order_seed(tcfg))])
        callbacks = [*callbacks, _stream_callback(plan, save_each_epoch)]
    trainer = cls(
        model=model,
        args=_training_args(cfg, tcfg, out, device, save_each_epoch, accumulation, plan),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


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
    from transformers import TrainerCallback, set_seed

    from lessctl.data.pool import encode_training_set
    from lessctl.distributed import local_device
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
    load_dtype, amp = _precision(cfg, tcfg, device)
    model = load_base_model(base, load_dtype, local_device(device), tokenizer=tok)
    if tcfg.packing and attention.available(device, amp is not None or load_dtype in ("bf16", "fp16")):
        attention.enable(model)
    model = add_lora(model, cfg.lora)
    out.mkdir(parents=True, exist_ok=True)
    plan = training_plan(len(examples), tcfg, accumulation, n_devices, save_each_epoch)

    resume_from = None
    history: list[float] = []
    if resume and save_each_epoch:
        done = _complete_checkpoints(out)
        if done:
            resume_from = done[-1]
            history = _check_resumable(resume_from)
            log.info("resuming from %s", resume_from)

    callbacks: list[Any] = [_lr_callback(history, out)]

    class _Log(TrainerCallback):  # every logged step into <run>/log_history.jsonl (a resumed run appends)
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:  # one line a step, not one a rank
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
        on_log({"step": 0, "max_steps": plan["max_steps"], "plan": plan})
    trainer = build_trainer(
        cfg, tcfg, model, tok, examples, out, device, save_each_epoch, accumulation, callbacks, plan
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    checkpoints: list[dict] = []
    if save_each_epoch:
        checkpoints = _manifest(out, history)
    else:
        trainer.save_model(str(out))
        tok.save_pretrained(str(out))
    resumed = str(resume_from) if resume_from else None
    return TrainResult(out, checkpoints, counts, time.time() - t0, resumed, plan, truncation.to_dict())
