"""Tests for warmup: per-epoch checkpoints, the learning-rate manifest, peft-loadable adapters, crash and resume."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lessctl._reference import expected_lrs
from lessctl.config import CONFIG_NAME, load_config, read_toml, to_toml
from lessctl.training import MANIFEST, RUN_FILE, read_checkpoints, warmup_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tiny_template):
    return load_config(tiny_template / CONFIG_NAME)


def schedule_lrs(total: int, peak: float, warmup_ratio: float) -> list[float]:
    """Learning rates of `total` optimizer steps, read off a real torch AdamW under transformers' linear schedule."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    # transformers 5 (TrainingArguments.get_warmup_steps): a float warmup_steps < 1 is ceil(ratio * total).
    warm = math.ceil(total * warmup_ratio)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=peak, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, warm, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return lrs


def test_warmup_steps_conversion_matches_transformers(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.03, report_to=[], use_cpu=True)
    for total in (9, 46, 100, 8459):
        assert args.get_warmup_steps(total) == math.ceil(total * 0.03)


def test_one_checkpoint_per_epoch(cfg):
    out = warmup_dir(cfg)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == read_checkpoints(cfg)
    assert [c["epoch"] for c in manifest] == list(range(1, cfg.warmup.epochs + 1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(f"checkpoint-{c['step']}" for c in manifest)
    for c in manifest:
        assert {"step", "epoch", "lr_mean"} <= set(c)
        d = out / f"checkpoint-{c['step']}"
        for f in ("optimizer.pt", "adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
            assert (d / f).is_file(), f"{d} lacks {f}"
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["global_step"] == c["step"]
        assert state["epoch"] == pytest.approx(c["epoch"])
    run = json.loads((out / RUN_FILE).read_text())
    assert run["kind"] == "warmup" and run["config"]["warmup"]["epochs"] == cfg.warmup.epochs


def test_optimizer_state_holds_adam_moments(cfg):
    import torch

    c = read_checkpoints(cfg)[0]
    opt = torch.load(warmup_dir(cfg) / f"checkpoint-{c['step']}" / "optimizer.pt", weights_only=True)
    n_lora = 2 * len(cfg.lora.target_modules) * 2  # 2 layers x modules x (A, B)
    assert len(opt["state"]) == n_lora
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in opt["state"].values())
    group = opt["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.0


def test_lr_mean_is_the_schedule_mean_per_epoch(cfg):
    t = cfg.warmup
    n_pool = sum(sum(1 for line in p.read_text().splitlines() if line.strip()) for p in cfg.train_files().values())
    n_examples = int(n_pool * t.percentage)
    counts = json.loads((warmup_dir(cfg) / RUN_FILE).read_text())["counts"]
    assert counts == {"pool": n_pool, "subset": n_examples, "dropped_no_labels": 0}
    per_epoch = math.ceil(n_examples / (t.batch_size * t.gradient_accumulation_steps))
    total = per_epoch * t.epochs
    lrs = schedule_lrs(total, t.learning_rate, t.warmup_ratio)
    manifest = read_checkpoints(cfg)
    assert [c["step"] for c in manifest] == [per_epoch * (e + 1) for e in range(t.epochs)]
    for e, c in enumerate(manifest):
        epoch_lrs = lrs[e * per_epoch : (e + 1) * per_epoch]
        assert c["lr_mean"] == pytest.approx(sum(epoch_lrs) / len(epoch_lrs), rel=1e-9, abs=0)
    assert expected_lrs(total, t.learning_rate, t.warmup_ratio) == pytest.approx(lrs, rel=1e-9, abs=1e-15)
    # the history saved with the last checkpoint is the optimizer's actual learning rates
    last = warmup_dir(cfg) / f"checkpoint-{manifest[-1]['step']}" / "lessctl_lrs.json"
    assert json.loads(last.read_text())["lrs"] == pytest.approx(lrs, rel=1e-9, abs=1e-15)


def test_adapter_loads_with_peft(cfg, tiny_template):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    c = read_checkpoints(cfg)[-1]
    d = warmup_dir(cfg) / f"checkpoint-{c['step']}"
    adapter_cfg = json.loads((d / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == cfg.lora.r and adapter_cfg["lora_alpha"] == cfg.lora.alpha
    assert sorted(adapter_cfg["target_modules"]) == sorted(cfg.lora.target_modules)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_template / "model"))
    model = PeftModel.from_pretrained(base, str(d))
    saved = load_file(str(d / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded) and len(saved) == 2 * len(cfg.lora.target_modules) * 2
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it was trained
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, base.config.vocab_size) and torch.isfinite(logits).all()


def test_complete_warmup_is_not_redone(tiny_ws, cli):
    r = cli("--config", tiny_ws / CONFIG_NAME, "warmup")
    assert r.code == 2, r
    assert r.err.strip().startswith("error: warmup is already complete in") and "--force" in r.err


# --------------------------------------------------------------------------- crash and resume


def fresh_workspace(template: Path, dst: Path) -> Path:
    """A copy of the tiny workspace without its warmup, set to 3 quick epochs (18 examples, 3 steps each)."""
    shutil.copytree(template, dst, ignore=shutil.ignore_patterns("out"))
    path = dst / CONFIG_NAME
    raw = read_toml(path)
    raw["warmup"].update(epochs=3, percentage=0.05)
    path.write_text(to_toml(raw))
    return path


def adapter_tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_template, tmp_path, cli):
    import torch

    crashed = fresh_workspace(tiny_template, tmp_path / "crashed")
    clean = fresh_workspace(tiny_template, tmp_path / "clean")
    out_crashed = crashed.parent / "out" / "warmup"

    env = {**os.environ, "LESSCTL_TEST_EXIT_AFTER_SAVES": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lessctl.cli", "--config", str(crashed), "warmup", "--device", "cpu"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]  # the hard exit right after the first save
    assert sorted(p.name for p in out_crashed.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out_crashed / MANIFEST).exists()
    first_saved = (out_crashed / "checkpoint-3" / "adapter_model.safetensors").stat().st_mtime_ns

    r = cli("--config", crashed, "warmup", "--device", "cpu", "--json")  # no exit hook in this process
    assert r.code == 0, r
    resumed = json.loads(r.out)
    assert resumed["resumed_from"] == str(out_crashed / "checkpoint-3")
    assert (out_crashed / "checkpoint-3" / "adapter_model.safetensors").stat().st_mtime_ns == first_saved  # not redone

    r = cli("--config", clean, "warmup", "--device", "cpu", "--json")
    assert r.code == 0, r
    uninterrupted = json.loads(r.out)
    assert uninterrupted["resumed_from"] is None

    a = json.loads((out_crashed / MANIFEST).read_text())
    b = json.loads((clean.parent / "out" / "warmup" / MANIFEST).read_text())
    assert [(c["step"], c["epoch"]) for c in a] == [(c["step"], c["epoch"]) for c in b] == [(3, 1), (6, 2), (9, 3)]
    for x, y in zip(a, b):
        assert abs(x["lr_mean"] - y["lr_mean"]) <= 1e-12
    assert resumed["checkpoints"] == a and uninterrupted["checkpoints"] == b
    # the tolerance is far below what one epoch of training changes, so a wrong resume could not pass
    first, last = adapter_tensors(out_crashed / a[0]["path"]), adapter_tensors(out_crashed / a[-1]["path"])
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3
    for c in a:
        ta = adapter_tensors(out_crashed / c["path"])
        tb = adapter_tensors(clean.parent / "out" / "warmup" / c["path"])
        assert set(ta) == set(tb)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-5, msg=lambda m, k=k, c=c: f"{c['path']} {k}: {m}")
