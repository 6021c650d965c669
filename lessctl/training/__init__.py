"""Warmup and finetune: LoRA training (transformers Trainer + peft), padding-free by default.

- `loop`: the training loop both share (Trainer arguments, the optimizer-step plan, resume).
- `trainers`: the loss of an optimizer step (LESS's example weighting or transformers 5's token weighting),
  over batch-of-one passes or over padding-free packs of the step's examples.
- `runs`: the warmup and finetune runs, the checkpoint manifest and the run record.
"""

from lessctl.training.loop import (
    LOG_FILE,
    LR_FILE,
    MANIFEST,
    RUN_FILE,
    TrainResult,
    accumulation_steps,
    train_lora,
    training_plan,
    world_size,
)
from lessctl.training.runs import (
    checkpoint_dir,
    checkpoints_path,
    read_checkpoints,
    run_finetune,
    run_warmup,
    warmup_dir,
    warmup_run_id,
)

__all__ = [
    "LOG_FILE",
    "LR_FILE",
    "MANIFEST",
    "RUN_FILE",
    "TrainResult",
    "accumulation_steps",
    "checkpoint_dir",
    "checkpoints_path",
    "read_checkpoints",
    "run_finetune",
    "run_warmup",
    "train_lora",
    "training_plan",
    "warmup_dir",
    "warmup_run_id",
    "world_size",
]
