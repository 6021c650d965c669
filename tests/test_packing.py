"""Padding-free packed training equals LESS's batch-of-one passes: the packs, one step's gradient, and
whole warmups (checkpoints, manifest, losses) trained both ways."""

import json
import random

import pytest

from lessctl._reference import step_gradient
from lessctl.config import CONFIG_NAME, build_config, read_toml, to_toml
from lessctl.training.trainers import PackingCollator, pack_groups, pack_loss


def test_pack_groups_places_every_example_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
        budget = rng.randint(50, 1000)
        packs = pack_groups(lengths, budget)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        for p in packs:
            assert len(p) == 1 or sum(lengths[i] for i in p) <= budget
        assert packs == pack_groups(lengths, budget)
    # first fit, longest first: 5+4 fill one pack, 3+3+2 the next
    assert pack_groups([3, 5, 2, 4, 3], 9) == [[1, 3], [0, 4, 2]]
    assert pack_groups([20, 1], 8) == [[0], [1]]  # longer than the budget: alone


def test_collator_lays_examples_end_to_end_with_restarting_positions():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    ]
    batch = PackingCollator(pack_tokens=6)(feats)
    assert batch["n_examples"] == 3 and batch["n_label_tokens"] == 2 + 1 + 2
    packs = batch["packs"]
    assert [p["n_examples"] for p in packs] == [2, 1]
    a, b = packs
    assert a["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9]]
    assert a["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert a["labels"].tolist() == [[-100, -100, 3, 4, -100, 9]]  # no token predicts the next example's first
    assert a["example_index"].tolist() == [0, 0, 0, 0, 1, 1]
    assert b["input_ids"].tolist() == [[5, 6, 7]] and b["labels"].tolist() == [[-100, 6, 7]]


def _lora_model(tiny_template):
    import torch
    from transformers import AutoModelForCausalLM

    from lessctl.config import load_config
    from lessctl.models import add_lora

    cfg = load_config(tiny_template / CONFIG_NAME)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_template / "model"), dtype=torch.float32)
    lora = type(cfg.lora)(**{**cfg.lora.__dict__, "dropout": 0.0})
    model = add_lora(model, lora)
    with torch.no_grad():  # a LoRA B of zeros would make the adapter's gradient structure trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    return cfg, model


@pytest.mark.parametrize("weighting", ["example", "token"])
@pytest.mark.parametrize("pack_tokens", [64, 256, 100000])
def test_a_packed_step_has_the_batch_of_one_gradient(tiny_template, weighting, pack_tokens):
    """One optimizer step's gradient from packs equals the one-example-at-a-time accumulation (float32,
    no dropout): relative error below 1e-5, for packs of one example, of several, and of the whole step."""
    import torch

    from lessctl.data.pool import build_training_set
    from lessctl.models import load_tokenizer

    cfg, model = _lora_model(tiny_template)
    tok = load_tokenizer(str(tiny_template / "model"))
    examples, _ = build_training_set(cfg.train_files(), tok, cfg.model.max_seq_length, "tulu", 1.0, 0)
    examples = examples[:24]
    assert len({len(e.input_ids) for e in examples}) > 5  # lengths differ, so packs mix examples

    want = step_gradient(model, examples, weighting)
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch = PackingCollator(pack_tokens)(feats)
    if pack_tokens == 256:
        assert any(p["n_examples"] > 1 for p in batch["packs"]) and len(batch["packs"]) > 1
    denominator = batch["n_examples"] if weighting == "example" else batch["n_label_tokens"]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    got = [torch.zeros_like(p) for p in params]
    for pack in batch["packs"]:
        loss = pack_loss(model, pack, weighting) / denominator
        for g, d in zip(got, torch.autograd.grad(loss, params)):
            g += d
    got = torch.cat([g.reshape(-1) for g in got])
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel


def _workspace(tiny_template, root, packing: bool, data):
    root.mkdir(parents=True)
    raw = read_toml(tiny_template / CONFIG_NAME)
    raw["model"].update(name_or_path=str(tiny_template / "model"), dtype="fp32")
    raw["lora"]["dropout"] = 0.0
    raw["data"]["train"] = {k: str(v) for k, v in data.items()}
    raw["warmup"].update(
        percentage=1.0, epochs=2, batch_size=1, gradient_accumulation_steps=4, packing=packing, pack_tokens=200
    )
    path = root / CONFIG_NAME
    path.write_text(to_toml(raw))
    return build_config(raw, path=path)


@pytest.mark.slow
def test_packed_warmup_trains_what_the_batch_of_one_warmup_trains(tiny_template, tmp_path):
    """Two epochs of several steps each, trained both ways: the same checkpoints and checkpoint weights,
    the same logged losses, and adapters equal to float32 rounding."""
    import torch
    from safetensors.torch import load_file

    from lessctl.config import load_config
    from lessctl.data.records import read_jsonl
    from lessctl.training import run_warmup

    src = load_config(tiny_template / CONFIG_NAME)
    name, path = next(iter(src.train_files().items()))
    # 22 examples, 4 a step in LESS's step stream: floor(22 / 4) = 5 steps an epoch, the 6th straddles the epochs
    lines = path.read_text(encoding="utf-8").splitlines()[:22]
    data = tmp_path / "pool.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(read_jsonl(data)) == 22

    runs = {}
    for packing in (False, True):
        cfg = _workspace(tiny_template, tmp_path / f"packing-{packing}", packing, {name: data})
        res = run_warmup(cfg, device="cpu")
        logged = [json.loads(x) for x in (res.output_dir / "log_history.jsonl").read_text().splitlines()]
        runs[packing] = (res, [r["loss"] for r in logged if "loss" in r])
    (one, loss_one), (packed, loss_packed) = runs[False], runs[True]
    assert one.plan["steps_per_epoch"] == packed.plan["steps_per_epoch"] == 5
    assert [c["step"] for c in packed.checkpoints] == [c["step"] for c in one.checkpoints] == [5, 10]
    assert [c["lr_mean"] for c in packed.checkpoints] == [c["lr_mean"] for c in one.checkpoints]
    assert len(loss_one) == len(loss_packed) == 10
    torch.testing.assert_close(torch.tensor(loss_packed), torch.tensor(loss_one), rtol=1e-4, atol=1e-5)
    first = load_file(one.output_dir / "checkpoint-5" / "adapter_model.safetensors")
    for c in one.checkpoints:
        a = load_file(one.output_dir / c["path"] / "adapter_model.safetensors")
        b = load_file(packed.output_dir / c["path"] / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    last = load_file(one.output_dir / "checkpoint-10" / "adapter_model.safetensors")
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3  # training moved the adapter


def test_pack_tokens_must_be_positive(tiny_ws, cli):
    path = tiny_ws / CONFIG_NAME
    path.write_text(path.read_text().replace("[warmup]\n", "[warmup]\npack_tokens = 0\n", 1))
    r = cli("--config", path, "warmup", "--device", "cpu")
    assert r.code == 2 and r.err.count("\n") == 1 and "warmup.pack_tokens" in r.err, r


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="the varlen kernel runs on CUDA")
def test_varlen_attention_packs_equal_separate_examples_on_cuda():
    """On CUDA, packs attend through torch's varlen flash kernel: the loss and gradient of a packed step
    equal the batch-of-one accumulation's up to bf16 rounding, as do sdpa's block-diagonal packs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lessctl.config import build_config
    from lessctl.models import add_lora
    from lessctl.training import varlen

    assert varlen.available("cuda")
    cfg = LlamaConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        vocab_size=1000, max_position_embeddings=2048,
    )  # fmt: skip
    rng = random.Random(1)
    feats = []
    for _ in range(12):
        n = rng.randint(20, 400)
        ids = [rng.randint(3, 999) for _ in range(n)]
        feats.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    lora = build_config({"lora": {"r": 8, "alpha": 16, "dropout": 0.0}}).lora
    grads = {}
    for mode in ("separate", "sdpa", "varlen"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        if mode == "varlen":
            varlen.enable(base)
        model = add_lora(base, lora)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        batches = [[f] for f in feats] if mode == "separate" else [feats]
        total, acc = 0.0, [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for b in batches:
            for pack in PackingCollator(1500)(b)["packs"]:
                pack = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack.items()}
                loss = pack_loss(model, pack, "example", varlen=mode == "varlen") / len(feats)
                total += loss.item()
                for a, g in zip(acc, torch.autograd.grad(loss, params)):
                    a += g.float()
        grads[mode] = (total, torch.cat([a.reshape(-1) for a in acc]))
    ref_loss, ref = grads["separate"]
    for mode in ("sdpa", "varlen"):
        loss, g = grads[mode]
        assert abs(loss - ref_loss) / ref_loss < 1e-2, (mode, loss, ref_loss)
        assert torch.nn.functional.cosine_similarity(g, ref, dim=0) > 0.999, mode
