"""Tests for warmup: per-epoch checkpoints, the learning-rate manifest, peft-loadable adapters, crash and resume."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lessctl._reference import expected_lrs, step_gradient
from lessctl.config import CONFIG_NAME, build_config, load_config, read_toml, to_toml
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
    # LESS's step stream (transformers 4.36): epochs x floor(examples / step) steps, each epoch's checkpoint where
    # its examples end in the stream
    per_step = t.batch_size * t.gradient_accumulation_steps
    assert t.step_stream == "less" and n_examples % per_step  # steps straddle epochs here
    total = n_examples // per_step * t.epochs
    ends = [0] + [min(total, (e + 1) * n_examples // per_step) for e in range(t.epochs)]
    lrs = schedule_lrs(total, t.learning_rate, t.warmup_ratio)
    manifest = read_checkpoints(cfg)
    assert [c["step"] for c in manifest] == ends[1:]
    for e, c in enumerate(manifest):
        epoch_lrs = lrs[ends[e] : ends[e + 1]]
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
    """A copy of the tiny workspace without its warmup, set to 3 quick epochs (18 examples, 8 a step: LESS's
    step stream takes 3 x floor(18 / 8) = 6 steps, checkpoints 2, 4, 6; the 3rd and 5th straddle two epochs)."""
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
    assert sorted(p.name for p in out_crashed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out_crashed / MANIFEST).exists()
    first_saved = (out_crashed / "checkpoint-2" / "adapter_model.safetensors").stat().st_mtime_ns

    r = cli("--config", crashed, "warmup", "--device", "cpu", "--json")  # no exit hook in this process
    assert r.code == 0, r
    resumed = json.loads(r.out)
    assert resumed["resumed_from"] == str(out_crashed / "checkpoint-2")
    assert (out_crashed / "checkpoint-2" / "adapter_model.safetensors").stat().st_mtime_ns == first_saved  # not redone

    r = cli("--config", clean, "warmup", "--device", "cpu", "--json")
    assert r.code == 0, r
    uninterrupted = json.loads(r.out)
    assert uninterrupted["resumed_from"] is None

    a = json.loads((out_crashed / MANIFEST).read_text())
    b = json.loads((clean.parent / "out" / "warmup" / MANIFEST).read_text())
    assert [(c["step"], c["epoch"]) for c in a] == [(c["step"], c["epoch"]) for c in b] == [(2, 1), (4, 2), (6, 3)]
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


# --------------------------------------------------------------------------- loss weighting

# Examples of very different lengths, so that weighing by example and by label token give different gradients.
WEIGHTING_EXAMPLES = [
    ("add 2 and 3", "5"),
    ("reverse the words: red green blue yellow", "yellow blue green red"),
    ("count the letters of apple", "5"),
    ("sort 9 4 7 1 8 2 6 3", "1 2 3 4 6 7 8 9 and that is the whole list sorted from the smallest to the largest"),
    ("uppercase cat", "CAT"),
    ("antonym of hot", "cold"),
]


def one_step_workspace(tiny_template: Path, root: Path, weighting: str, packing: bool = True):
    """A workspace whose warmup is exactly one optimizer step over all six examples (batch 2 x 3 passes) in
    float32 on the CPU, without LoRA dropout: its first checkpoint holds the Adam state after that step."""
    from lessctl.config import build_config

    root.mkdir(parents=True)
    data = root / "six.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in WEIGHTING_EXAMPLES
        )
    )
    raw = read_toml(tiny_template / CONFIG_NAME)
    raw["model"].update(name_or_path=str(tiny_template / "model"), dtype="fp32")
    raw["lora"]["dropout"] = 0.0
    raw["data"]["train"] = {"six": str(data)}
    raw["warmup"].update(
        percentage=1.0, epochs=1, batch_size=2, gradient_accumulation_steps=3, loss_weighting=weighting, packing=packing
    )
    path = root / CONFIG_NAME
    path.write_text(to_toml(raw))
    return build_config(raw, path=path)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("weighting", ["example", "token"])
def test_one_step_gradient_is_the_weighted_mean(tiny_template, tmp_path, weighting, packing):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lessctl.data.pool import build_training_set
    from lessctl.models import load_tokenizer
    from lessctl.training import train_lora

    cfg = one_step_workspace(tiny_template, tmp_path / weighting, weighting, packing)
    out = tmp_path / weighting / "warm"
    res = train_lora(cfg, cfg.warmup, cfg.train_files(), out, save_each_epoch=True, device="cpu")
    assert [c["step"] for c in res.checkpoints] == [1] and res.plan["steps_per_epoch"] == 1
    ckpt = out / "checkpoint-1"
    # the schedule's first learning rate is 0 (linear warmup from 0), so the checkpoint's adapter is the one
    # the gradient was taken at
    assert json.loads((ckpt / "lessctl_lrs.json").read_text())["lrs"] == [0.0]

    tok = load_tokenizer(cfg.model_ref())
    examples, _ = build_training_set(cfg.train_files(), tok, cfg.model.max_seq_length, "tulu", 1.0, 0)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_template / "model"), dtype=torch.float32), str(ckpt)
    )
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.eval()
    want = {w: step_gradient(model, examples, w) for w in ("example", "token")}
    cos = torch.nn.functional.cosine_similarity(want["example"], want["token"], dim=0)
    assert cos < 0.999, cos  # the two weightings differ here, so the test tells them apart

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    beta1 = opt["param_groups"][0]["betas"][0]
    exp_avg = torch.cat([opt["state"][i]["exp_avg"].reshape(-1) for i in sorted(opt["state"])])
    g = exp_avg / (1 - beta1)  # after one step, exp_avg = (1 - beta1) g
    ref = want[weighting]
    clip = min(1.0, 1.0 / (ref.norm().item() + 1e-6))  # the Trainer clips the gradient norm to 1 (max_grad_norm)
    torch.testing.assert_close(g, ref * clip, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- seeds


def test_three_seeds_have_less_defaults():
    from lessctl.config import Config
    from lessctl.training.loop import data_order_seed
    from lessctl.workspace import preset_config

    cfg = Config()
    # transformers 4.36 never read --data_seed (LESS's DATA_SEED=3): the data order came from --seed 0
    assert (cfg.warmup.sample_data_seed, cfg.warmup.seed, data_order_seed(cfg.warmup)) == (42, 0, 0)
    assert (cfg.finetune.seed, data_order_seed(cfg.finetune)) == (0, 0)
    for t in (cfg.warmup, cfg.finetune):  # LESS's loss, precision, batch and step stream in both stages
        assert t.loss_weighting == "example" and t.autocast is True
        assert t.effective_batch_size == 128 and t.step_stream == "less"
    # every preset, the tiny ones included, runs LESS's semantics (only the sizes shrink)
    for preset in ("tiny", "llama2-7b", "llama2-13b", "mistral-7b"):
        raw = preset_config(preset)
        for section in ("warmup", "finetune"):
            t = getattr(build_config(raw), section)
            assert (t.seed, data_order_seed(t), t.loss_weighting, t.step_stream) == (0, 0, "example", "less")
            assert section == "finetune" or t.sample_data_seed == 42


def test_bad_loss_weighting_is_named():
    from lessctl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"finetune.loss_weighting: expected example or token, got 'tokens'"):
        build_config({"finetune": {"loss_weighting": "tokens"}})


def test_warmup_subset_is_less_sample_over_the_pooled_files(data_dir, tiny_template):
    """The warmup trains on numpy.random.seed(42); permutation(N)[:int(0.05 N)] of the files' lines
    concatenated in config order (LESS loads its train files as one json dataset, in the order given)."""
    import numpy as np

    from lessctl.config import Config
    from lessctl.data.pool import build_training_set
    from lessctl.models import load_tokenizer

    files = {n: data_dir / "train" / "processed" / n / f"{n}_data.jsonl" for n in ("cot", "dolly", "oasst1")}
    pooled = [
        (name, i) for name, path in files.items() for i, line in enumerate(path.read_text().split("\n")) if line.strip()
    ]
    n = len(pooled)
    np.random.seed(42)
    want = [pooled[i] for i in np.random.permutation(n)[: int(0.05 * n)]]

    tok = load_tokenizer(str(tiny_template / "model"))
    t = Config().warmup
    examples, counts = build_training_set(files, tok, 2048, "tulu", t.percentage, t.sample_data_seed)
    assert counts == {"pool": n, "subset": int(0.05 * n), "dropped_no_labels": 0}
    assert [(e.source, e.line) for e in examples] == want


# --------------------------------------------------------------------------- effective batch


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-13b", "mistral-7b"])
def test_paper_presets_step_on_128_examples_on_any_number_of_devices(tmp_path, preset):
    from lessctl.training import accumulation_steps, training_plan
    from lessctl.workspace import init_workspace

    cfg = load_config(init_workspace(tmp_path / preset, preset))
    for section in ("warmup", "finetune"):
        t = getattr(cfg, section)
        for devices in (1, 2, 4, 8):
            acc = accumulation_steps(t, section, devices)
            assert t.batch_size * acc * devices == 128
            assert training_plan(13533, t, acc, devices, True)["examples_per_step"] == 128
    # 13,533 warmup examples (the README's) at 128 per step: LESS's step stream, 4 x floor(13533 / 128) = 420 steps
    for devices in (1, 2, 4, 8):
        plan = training_plan(13533, cfg.warmup, accumulation_steps(cfg.warmup, "warmup", devices), devices, True)
        assert plan["max_steps"] == 420 and plan["checkpoints"] == [105, 211, 317, 420]
    t = dataclasses.replace(cfg.warmup, step_stream="epoch")  # transformers 5's: every epoch ends with a step
    plan = training_plan(13533, t, accumulation_steps(t, "warmup", 4), 4, True)
    assert plan["steps_per_epoch"] == 106 and plan["checkpoints"] == [106, 212, 318, 424]


# princeton-nlp/LESS README.md: CKPTS="105 211 317 420" and the checkpoint weights it hard-codes
LESS_README_WEIGHTS = [1.6877e-05, 1.2859e-05, 7.7030e-06, 2.5616e-06]


def test_paper_pool_gives_less_checkpoints_and_weights_from_the_plan_alone(tmp_path):
    """LESS's pool (flan_v2, cot, dolly, oasst1: 270,679 examples) at the paper preset's 5%: int(0.05 x 270679) =
    13,533 warmup examples, 105, 211, 317, 420 as LESS's README lists, and checkpoint weights (the mean of the
    learning rates of each checkpoint's steps, under transformers' linear schedule over the plan's 420 steps)
    within 1% of the README's hard-coded ones (the first: 1.004%; README.md says why they differ)."""
    from lessctl.training import accumulation_steps, training_plan
    from lessctl.workspace import init_workspace

    cfg = load_config(init_workspace(tmp_path / "ws", "llama2-7b"))
    t = cfg.warmup
    n = int(270679 * t.percentage)
    assert n == 13533
    plan = training_plan(n, t, accumulation_steps(t, "warmup", 4), 4, True)
    assert plan["checkpoints"] == [105, 211, 317, 420]
    lrs = schedule_lrs(plan["max_steps"], t.learning_rate, t.warmup_ratio)  # a real AdamW under the real schedule
    bounds = [0, *plan["checkpoints"]]
    weights = [sum(lrs[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    for got, want in zip(weights, LESS_README_WEIGHTS):
        assert abs(got / want - 1) < 0.0101, (got, want)
    assert weights == pytest.approx([1.6707617e-05, 1.2899263e-05, 7.6904177e-06, 2.5552826e-06], rel=1e-6)


def test_less_step_stream_takes_each_epoch_from_a_seeded_random_sampler():
    """The stream: each epoch a RandomSampler permutation from one torch generator seeded with the Trainer's seed
    (as transformers 4.36's Trainer drew the order), the epochs end to end, cut after max_steps whole steps."""
    import torch

    from lessctl.training.loop import step_stream_order, training_plan

    t = build_config({"warmup": {"batch_size": 2, "effective_batch_size": 0, "gradient_accumulation_steps": 3}}).warmup
    plan = training_plan(22, t, 3, 1, True)  # 6 per step, 22 examples: 3 steps an epoch, 12 in all
    assert (plan["max_steps"], plan["checkpoints"]) == (12, [3, 7, 11, 12])
    g = torch.Generator().manual_seed(0)
    # an exhausted RandomSampler iteration draws two permutations (the second for num_samples % n = 0 of them)
    epochs = [[torch.randperm(22, generator=g).tolist(), torch.randperm(22, generator=g)][0] for _ in range(4)]
    order = step_stream_order(22, plan, 0)
    assert order == sum(epochs, [])[: 12 * 6]
    assert sorted(order[:22]) == list(range(22)) and order[18:24] == epochs[0][18:] + epochs[1][:2]  # a straddle
    assert step_stream_order(22, plan, 1) != order


def test_effective_batch_that_does_not_divide_is_an_error(tiny_template, tmp_path, cli, monkeypatch):
    path = fresh_workspace(tiny_template, tmp_path / "ws")
    raw = read_toml(path)
    raw["warmup"]["effective_batch_size"] = 8  # batch_size 4 x 3 devices = 12 does not divide 8
    path.write_text(to_toml(raw))
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = cli("--config", path, "warmup", "--device", "cpu")
    assert r.code == 2, r
    assert r.err.strip() == (
        "error: [warmup] effective_batch_size = 8 is not a multiple of batch_size 4 x 3 device(s) = 12"
    )
    assert not (path.parent / "out" / "warmup" / MANIFEST).exists()


def test_warmup_prints_its_steps_and_checkpoints_before_training(tiny_template, tmp_path, cli):
    path = fresh_workspace(tiny_template, tmp_path / "ws")  # 18 examples, 8 per step: 3 x floor(18 / 8) steps
    raw = read_toml(path)
    raw["warmup"].update(effective_batch_size=8, gradient_accumulation_steps=5)  # 8 / (4 x 1 device) = 2
    path.write_text(to_toml(raw))
    r = cli("--config", path, "warmup", "--device", "cpu")
    assert r.code == 0, r
    err = " ".join(r.err.split())  # the console wraps long lines
    first = err.index(
        "18 examples, 8 per optimizer step (4 x 2 accumulation x 1 device(s)), 2 steps per epoch x 3 epochs in "
        "LESS's step stream (a step may straddle two epochs): 6 steps"
    )
    assert err.index("checkpoints: checkpoint-2, checkpoint-4, checkpoint-6") > first
    assert err.index("warmup on 18 of") > first  # the summary after training comes later
    manifest = json.loads((path.parent / "out" / "warmup" / MANIFEST).read_text())
    assert [c["step"] for c in manifest] == [2, 4, 6]


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("dtype", "autocast", "loaded", "bf16"),
    [
        ("bf16", True, "fp32", True),
        ("bf16", False, "bf16", True),
        ("fp32", True, "fp32", False),
        ("auto", True, "fp32", False),
    ],
)
def test_precision_loads_float32_under_autocast(tmp_path, dtype, autocast, loaded, bf16):
    """LESS's way (autocast, the default): float32 base weights, bf16 autocast; else the weights in [model] dtype."""
    from lessctl.config import build_config
    from lessctl.training.loop import _precision, _training_args

    cfg = build_config({"model": {"dtype": dtype}, "warmup": {"autocast": autocast}})
    assert _precision(cfg, cfg.warmup, "cpu")[0] == loaded
    args = _training_args(cfg, cfg.warmup, tmp_path, "cpu", True, 32)
    assert args.bf16 is bf16 and args.fp16 is False
    # packed (the default): the Trainer's batch is the step's 32 examples; batch-of-one: 32 passes of one
    assert (args.seed, args.data_seed, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        0,
        0,
        32,
        1,
    )
    cfg = build_config({"model": {"dtype": dtype}, "warmup": {"autocast": autocast, "packing": False}})
    args = _training_args(cfg, cfg.warmup, tmp_path, "cpu", True, 32)
    assert (args.seed, args.data_seed, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        0,
        0,
        1,
        32,
    )


def test_every_logged_step_is_written_to_the_run_folder(tiny_ws, cli):
    """log_history.jsonl holds the loss and learning rate of every logged step, without any tracking service."""
    r = cli("--config", tiny_ws / "lessctl.toml", "warmup", "--force", "--epochs", "1", "--json")
    assert r.code == 0, r
    lines = [json.loads(ln) for ln in (tiny_ws / "out" / "warmup" / "log_history.jsonl").read_text().splitlines()]
    steps = [rec for rec in lines if "loss" in rec]
    assert steps and all("learning_rate" in rec and rec["step"] >= 1 for rec in steps)
    assert [rec["step"] for rec in steps] == sorted(rec["step"] for rec in steps)
    cfg = load_config(tiny_ws / "lessctl.toml")
    assert steps[-1]["step"] <= steps[-1]["max_steps"] and cfg.warmup.report_to == []


def test_report_to_must_be_a_list_of_names(tiny_ws, cli):
    toml = tiny_ws / "lessctl.toml"
    toml.write_text(toml.read_text().replace("[warmup]\n", '[warmup]\nreport_to = "tensorboard"\n', 1))
    r = cli("--config", toml, "warmup")
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and len(errors) == 1 and "warmup.report_to" in errors[0], r


@pytest.mark.slow
def test_warmup_force_under_torchrun_replaces_the_warmup_once(tiny_ws):
    """Two torchrun ranks on `warmup --force`: rank 0 alone writes checkpoints.json and the run file (ranks
    sharing `<file>.part` renamed each other's away) and moves warmup.new/ into place; the log holds one line a
    step; stdout holds one JSON document."""
    out = warmup_dir(load_config(tiny_ws / CONFIG_NAME))
    old_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    cmd += ["-m", "lessctl.cli", "--config", str(tiny_ws / CONFIG_NAME), "warmup", "--force", "--epochs", "2"]
    proc = subprocess.run([*cmd, "--device", "cpu", "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one document: rank 1 prints nothing
    assert summary["plan"]["devices"] == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert [c["step"] for c in manifest] == [c["step"] for c in summary["checkpoints"]] and len(manifest) == 2
    run = json.loads((out / RUN_FILE).read_text())
    assert run["run_id"] != old_id and not out.with_name(out.name + ".new").exists()
    logged = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in logged if "loss" in r]  # one line a step (the run's summary line aside)
    assert len(losses) == len(set(losses)) == manifest[-1]["step"]
    for c in manifest:
        lrs = json.loads((out / f"checkpoint-{c['step']}" / "lessctl_lrs.json").read_text())["lrs"]
        assert len(lrs) == c["step"]
    assert not list(out.rglob("*.part"))


def test_an_added_token_embedding_is_the_mean_of_the_others(tiny_template):
    """LESS adds a `<pad>` token to Llama's tokenizer and resizes the embeddings: transformers 4.36 drew the new
    row at random; transformers 5 (lessctl) sets it to the mean of the other rows (README's difference table)."""
    import torch

    from lessctl.models import load_base_model, load_tokenizer

    model_dir = tiny_template / "model"
    tok = load_tokenizer(str(model_dir))
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<lessctl-extra>"]})
    assert len(tok) == n + 1
    model = load_base_model(str(model_dir), "fp32", "cpu", tokenizer=tok)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] >= n + 1
    torch.testing.assert_close(emb[n], emb[:n].mean(0), rtol=1e-4, atol=1e-5)
