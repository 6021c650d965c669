"""Evaluation: metrics against hand-computed values, golden prompts from the real data, tiny end-to-end runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from eval_helpers import DATA, StubLM, build_model_dir, save_lora_adapter

from lessctl.errors import InputError, MissingArtifactError
from lessctl.evaluation import bbh, mmlu, tydiqa
from lessctl.evaluation.generation import ProgressHook, cut_at_stop, generate_greedy
from lessctl.evaluation.metrics import (
    bbh_exact_match,
    extract_bbh_answer,
    normalize_squad,
    pick_choice,
    squad_exact_match,
    squad_f1,
    squad_scores,
)
from lessctl.evaluation.results import append_result, read_results, write_eval_json
from lessctl.evaluation.runner import (
    HEADLINE,
    ModelSpec,
    describe_model,
    evaluate_task,
    finetuned_models,
    run_evaluation,
)

needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"real data not found at {DATA}")


# ---------------------------------------------------------------------------------------------- metrics


def test_squad_normalization_and_em():
    assert normalize_squad("The  Cat, sat!  ") == "cat sat"
    assert normalize_squad("an apple a day") == "apple day"
    assert squad_exact_match("Home Box Office.", "home box office") == 1.0
    assert squad_exact_match("the HBO", "HBO!") == 1.0
    assert squad_exact_match("Home Box", "Home Box Office") == 0.0


def test_squad_f1_by_hand():
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: 3 shared, P = 3/4, R = 1, F1 = 6/7.
    assert squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count once per occurrence: pred [a1? no: "b b c"] vs gold "b c c": shared b, c -> P=R=2/3.
    assert squad_f1("b b c", "b c c") == pytest.approx(2 / 3)
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "cat") == 0.0
    em, f1 = squad_scores("Kigali city", ["Kampala", "Kigali"])
    assert em == 0.0 and f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert squad_scores("Kigali", ["Kampala", "kigali."]) == (1.0, 1.0)


def test_bbh_answer_extraction():
    out = "Let's think step by step.\nZ = not True = False. So the answer is (B)."
    assert extract_bbh_answer(out) == "(B)"
    assert extract_bbh_answer("So the answer is  Yes .") == "Yes"
    # the pattern is open-instruct's, exactly: "So the answer is", capital S
    assert extract_bbh_answer("Therefore, the answer is 24.") == "Therefore, the answer is 24."
    assert extract_bbh_answer("so the answer is 24. So the answer is 25.") == "25"
    # no phrase: the first paragraph
    assert extract_bbh_answer("  valid \n\nQ: next question") == "valid"
    assert extract_bbh_answer("True") == "True"
    assert extract_bbh_answer("") == ""


def test_bbh_exact_match_ignores_case_and_punctuation():
    assert bbh_exact_match("(b)", "(B)") == 1.0
    assert bbh_exact_match("b", "(B)") == 1.0
    assert bbh_exact_match("Valid.", "valid") == 1.0
    assert bbh_exact_match("invalid", "valid") == 0.0
    assert bbh_exact_match("12/14/1937", "12/14/1937") == 1.0
    assert bbh_exact_match("( ) ]", ") ]") == 0.0  # punctuation goes, spaces stay


def test_mmlu_choice_from_logits():
    assert pick_choice([0.1, 2.0, -1.0, 0.5]) == 1
    assert pick_choice([-3.0, -2.0, -1.0, -0.5]) == 3
    assert pick_choice([1.0, 1.0, 0.0, 0.0]) == 0  # ties: the first, like argmax


def test_cut_at_stop():
    assert cut_at_stop("Kigali\nQuestion: x", ["\n"]) == "Kigali"
    assert cut_at_stop("a\nb\n\nc", ["\n\n"]) == "a\nb"
    assert cut_at_stop("abc", ["\n\n", "c"]) == "ab"
    assert cut_at_stop("abc", []) == "abc"


def test_progress_hook_forms():
    got = []

    class Callback:
        def __call__(self, n):
            got.append(n)

        def set_total(self, n):
            got.append(("total", n))

    h = ProgressHook(Callback())
    h.start(5)
    h.advance(2)
    ProgressHook(lambda n: got.append(-n)).advance(3)
    ProgressHook(None).advance(1)
    assert got == [("total", 5), 2, -3]

    from rich.progress import Progress

    with Progress(disable=True) as prog:
        h = ProgressHook(prog, "mmlu")
        h.start(4)
        h.advance(3)
        assert prog.tasks[0].total == 4 and prog.tasks[0].completed == 3


# ---------------------------------------------------------------------------------------------- golden prompts


@needs_data
def test_mmlu_golden_five_shot_prompt():
    root = DATA / "eval/mmlu"
    with open(root / "dev/abstract_algebra_dev.csv", newline="") as fh:
        dev = list(csv.reader(fh))
    with open(root / "test/abstract_algebra_test.csv", newline="") as fh:
        row = next(csv.reader(fh))
    prompt = mmlu.build_prompt("abstract_algebra", dev, row, 5)
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K "
        "are subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
    )
    assert prompt.endswith(
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert prompt.count("\nAnswer:") == 6
    zero = mmlu.build_prompt("abstract_algebra", dev, row, 0)
    assert zero == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )


@needs_data
def test_bbh_golden_cot_prompt():
    root = DATA / "eval/bbh"
    cot = bbh.read_cot_prompt(root / "cot-prompts/boolean_expressions.txt")
    prompt = bbh.build_prompt(cot, "not ( True ) and ( True ) is")
    assert prompt.startswith(
        "Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) is\n"
        "A: Let's think step by step.\n"
    )
    assert prompt.endswith(
        "Plugging in A, we get: Z = not not ( A ) = not not (True) = not not False = True. So the answer is True."
        "\n\nQ: not ( True ) and ( True ) is\nA:"
    )
    assert "canary" not in prompt and "-----" not in prompt
    assert prompt.count("\n\nQ: ") == 3 + 1  # three shots after the task line, then the question
    tulu = bbh.build_prompt(cot, "x is", "tulu")
    assert tulu.startswith("<|user|>\nEvaluate the result") and tulu.endswith("\n\nQ: x is\n<|assistant|>\nA:")


def test_bbh_seeded_sample():
    exs = [{"input": str(i), "target": "t"} for i in range(100)]
    a = bbh.sample_examples(exs, "task_a", 40, 42)
    assert len(a) == 40 and a == bbh.sample_examples(exs, "task_a", 40, 42)
    assert a != bbh.sample_examples(exs, "task_b", 40, 42)
    assert a != bbh.sample_examples(exs, "task_a", 40, 43)
    assert bbh.sample_examples(exs[:10], "task_a", 40, 42) == exs[:10]
    assert bbh.sample_examples(exs, "task_a", None, 42) == exs


@needs_data
def test_tydiqa_golden_prompt():
    shots = tydiqa.read_shots(DATA / "eval/tydiqa/tydiqa-one-shot.json")
    dev = tydiqa.read_dev(DATA / "eval/tydiqa/tydiqa-goldp-v1.1-dev_ini.json")
    assert len(dev) == 9 and dev[0]["lang"] == "finnish" and dev[0]["answers"] == ["Kigali"]
    en = [ex for ex in dev if ex["lang"] == "english"][0]
    hbo = (
        "Home Box Office (HBO) is an American premium cable and satellite television network that is owned by "
        "the namesake unit Home Box Office, Inc., a division of AT&T's WarnerMedia. The program which featured on "
        "the network consists primarily of theatrically released motion pictures and original television shows, "
        "along with made-for-cable movies, documentaries and occasional comedy and concert specials."
    )
    prompt = tydiqa.build_prompt("english", shots["english"], en["context"], en["question"])
    assert prompt == (
        "<|user|>\n"
        "Answer the following question based on the information in the given passage.\n\n"
        f"Passage: {hbo}\nQuestion: Who owns HBO?\nAnswer: Home Box Office\n\n"
        f"Passage: {hbo}\nQuestion: Who owns HBO?\n"
        "\n<|assistant|>\nAnswer:"
    )
    plain = tydiqa.build_prompt("finnish", None, "Konteksti.", "Kysymys?", "plain")
    assert plain == (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.\n\n"
        "Kappale: Konteksti.\nKysymys: Kysymys?\nVastaus:"
    )


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run far faster on one thread: OpenMP threads spin-wait for each other on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    if not (DATA / "eval").is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from lessctl.models import load_model_for_eval

    return load_model_for_eval(tiny_dir, device="cpu")


def test_context_trim(tiny):
    _, tok = tiny
    ctx = " ".join(["word"] * 300)
    short = tydiqa.trim_context(tok, ctx, 10)  # LESS's 10 counts the BOS: 9 tokens of text
    assert len(tok.encode(short, add_special_tokens=False)) == 9 and ctx.startswith(short)
    assert tydiqa.trim_context(tok, "short text", 512) == "short text"


def test_batched_generation_matches_one_by_one(tiny):
    model, tok = tiny
    prompts = ["<|user|>\nWho owns HBO?\n<|assistant|>\nAnswer:", "Q: not True is\nA:", "The following are"]
    batched, _ = generate_greedy(model, tok, prompts, max_new_tokens=12, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=12, batch_size=1)[0][0] for p in prompts]
    assert batched == single
    assert all(isinstance(o, str) for o in batched)


def test_stops_are_honoured_per_sequence(tiny):
    model, tok = tiny
    prompts = ["<|user|>\nWho owns HBO?\n<|assistant|>\nAnswer:", "Q: not True is\nA:"]
    free, _ = generate_greedy(model, tok, prompts, max_new_tokens=16, batch_size=2)
    # A stop string taken from the middle of the first row's continuation.
    text = free[0]
    assert len(text) >= 4, free
    stop = text[2:4]
    stopped, _ = generate_greedy(model, tok, prompts, max_new_tokens=16, stop=[stop], batch_size=2)
    assert stopped[0] == text[: text.find(stop)]
    # The second row runs on to its own stop (or to the token limit), unaffected by the first.
    assert stopped[1] == cut_at_stop(free[1], [stop])


def test_long_prompts_keep_their_end_within_the_context(tiny):
    model, tok = tiny
    long_prompt = "apple river stone " * 400 + "Answer:"
    assert len(tok(long_prompt, verbose=False)["input_ids"]) > 512
    outs, truncated = generate_greedy(model, tok, [long_prompt, "Q: x\nA:"], max_new_tokens=400, batch_size=2)
    assert truncated == 1 and len(outs) == 2


@needs_data
def test_mmlu_plumbing_with_a_stub_that_always_says_c(tiny):
    _, tok = tiny
    c_id = mmlu.choice_token_ids(tok)[2]
    stub = StubLM(len(tok), c_id)
    res = mmlu.evaluate_mmlu(stub, tok, DATA, subjects=["abstract_algebra", "anatomy"], batch_size=16)
    answers = {}
    for s in ("abstract_algebra", "anatomy"):
        with open(DATA / f"eval/mmlu/test/{s}_test.csv", newline="") as fh:
            answers[s] = [r[5] for r in csv.reader(fh)]
    n = sum(len(v) for v in answers.values())
    assert res["n"] == n
    assert res["accuracy"] == pytest.approx(100 * sum(a.count("C") for a in answers.values()) / n)
    assert res["subjects"]["anatomy"]["accuracy"] == pytest.approx(
        100 * answers["anatomy"].count("C") / len(answers["anatomy"])
    )
    assert set(res["categories"]) == {"STEM", "other"}
    assert all(p["prediction"] == "C" for p in res["predictions"])
    assert res["settings"]["prompts_with_fewer_shots"] == 0


@needs_data
def test_mmlu_drops_shots_when_too_long(tiny):
    model, tok = tiny
    res = mmlu.evaluate_mmlu(
        model, tok, DATA, limit=2, subjects=["high_school_european_history"], max_prompt_tokens=400
    )
    assert res["n"] == 2 and res["settings"]["prompts_with_fewer_shots"] == 2


@needs_data
def test_mmlu_end_to_end(tiny):
    model, tok = tiny
    seen = []
    res = evaluate_task("mmlu", model, tok, DATA, limit=2, batch_size=16, progress=seen.append)
    assert res["task"] == "mmlu" and res["n"] == 57 * 2 and sum(seen) == 57 * 2
    assert 0 <= res["accuracy"] <= 100
    assert len(res["subjects"]) == 57 and set(res["categories"]) == {"STEM", "humanities", "social sciences", "other"}
    assert sum(c["n"] for c in res["categories"].values()) == 57 * 2
    assert all(p["prediction"] in "ABCD" for p in res["predictions"])
    json.dumps(res)


@needs_data
def test_bbh_end_to_end(tiny):
    model, tok = tiny
    res = evaluate_task("bbh", model, tok, DATA, limit=2, batch_size=16, max_new_tokens=6)
    assert res["task"] == "bbh" and res["n"] == 27 * 2
    assert len(res["tasks"]) == 27 and all(t["n"] == 2 for t in res["tasks"].values())
    assert 0 <= res["exact_match"] <= 100
    assert res["settings"]["examples_per_task"] == 40 and res["settings"]["seed"] == 42
    assert all({"output", "prediction", "target", "correct"} <= set(p) for p in res["predictions"])
    assert all("\n\n" not in p["output"] for p in res["predictions"])
    json.dumps(res)


@needs_data
def test_tydiqa_end_to_end(tiny):
    model, tok = tiny
    res = evaluate_task("tydiqa", model, tok, DATA, limit=2, batch_size=16, max_new_tokens=8)
    assert res["task"] == "tydiqa" and res["n"] == 9
    assert len(res["languages"]) == 9
    assert 0 <= res["f1"] <= 100 and 0 <= res["exact_match"] <= 100
    assert res["f1"] == pytest.approx(sum(v["f1"] for v in res["languages"].values()) / 9)
    # The _ini dev file holds the exemplars themselves: noted, not refused.
    assert res["settings"]["dev_file"].endswith("tydiqa-goldp-v1.1-dev_ini.json")
    assert res["settings"]["shot_is_question"] == 9
    assert all("\n" not in p["prediction"] for p in res["predictions"])
    json.dumps(res)


# ---------------------------------------------------------------------------------------------- runs and outputs


def test_results_files(tmp_path):
    assert read_results(tmp_path) == []
    append_result(tmp_path, {"model": "a", "task": "mmlu", "score": 1.0})
    append_result(tmp_path, {"model": "b", "task": "bbh", "score": 2.0})
    assert [r["model"] for r in read_results(tmp_path)] == ["a", "b"]
    p = write_eval_json(tmp_path, "tydiqa-less", "tydiqa", {"f1": 3.0})
    assert p == tmp_path / "eval/tydiqa-less/tydiqa.json" and json.loads(p.read_text()) == {"f1": 3.0}
    assert not list(p.parent.glob("*.part"))
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write("{oops\n")
    with pytest.raises(InputError, match=r"results.jsonl:3: invalid JSON"):
        read_results(tmp_path)


def test_describe_and_discover_models(tmp_path):
    out = tmp_path / "out"
    (out / "finetune/tydiqa-less").mkdir(parents=True)
    (out / "finetune/tydiqa-less/adapter_config.json").write_text("{}")
    (out / "finetune/my-mmlu-random").mkdir(parents=True)
    (out / "finetune/my-mmlu-random/adapter_config.json").write_text("{}")
    (out / "finetune/my-mmlu-random/lessctl_run.json").write_text(json.dumps({"target": "mmlu", "method": "random"}))
    (out / "finetune/mmlu-random-seed4").mkdir(parents=True)
    (out / "finetune/mmlu-random-seed4/adapter_config.json").write_text("{}")
    (out / "finetune/empty").mkdir()
    specs = finetuned_models(out)
    # target and method come from the run record only: a folder name is never parsed (`mmlu-random-seed4` is not
    # target `mmlu-random`, method `seed4`)
    assert [(s.name, s.target, s.method) for s in specs] == [
        ("mmlu-random-seed4", None, None),
        ("my-mmlu-random", "mmlu", "random"),
        ("tydiqa-less", None, None),
    ]
    assert describe_model(tmp_path / "llama-7b", output_dir=out) == ModelSpec("llama-7b", str(tmp_path / "llama-7b"))
    assert describe_model("base", output_dir=out, base_model="/models/x") == ModelSpec("base", "/models/x")
    with pytest.raises(MissingArtifactError, match=r"no finetuned models in .*finetune; run `lessctl finetune"):
        finetuned_models(tmp_path / "nothing")


def test_missing_data_is_a_user_error(tmp_path):
    spec = ModelSpec("x", str(tmp_path / "no-model"))
    with pytest.raises(InputError, match=r"does not exist; expected a LESS-layout folder"):
        run_evaluation(spec, "mmlu", tmp_path / "nodata", tmp_path / "out")
    (tmp_path / "d/eval/tydiqa").mkdir(parents=True)
    with pytest.raises(InputError, match=r"no TydiQA dev set in .*tydiqa: expected .*tydiqa-goldp-v1.1-dev.json"):
        run_evaluation(spec, "tydiqa", tmp_path / "d", tmp_path / "out")
    (tmp_path / "d/eval/bbh/bbh").mkdir(parents=True)
    (tmp_path / "d/eval/bbh/bbh/navigate.json").write_text('{"examples": []}')
    with pytest.raises(InputError, match=r"cot-prompts/navigate.txt: no such file; expected"):
        run_evaluation(spec, "bbh", tmp_path / "d", tmp_path / "out")


@needs_data
def test_adapter_is_merged_and_run_is_recorded(tiny_dir, tmp_path):
    import torch

    from lessctl.models import load_model_for_eval

    out = tmp_path / "out"
    adapter = save_lora_adapter(tiny_dir, out / "finetune" / "tydiqa-less", run={"target": "tydiqa", "method": "less"})
    merged, tok = load_model_for_eval(adapter, device="cpu")
    base, _ = load_model_for_eval(tiny_dir, device="cpu")
    ids = torch.tensor([tok("Who owns HBO?")["input_ids"]])
    with torch.no_grad():
        lm, lb = merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not torch.allclose(lm, lb)  # the adapter's weights are in

    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_model_for_eval(tiny_dir, device="cpu")[0], str(adapter)).eval()
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, lm, atol=1e-4)

    [spec] = finetuned_models(out)
    outcome = run_evaluation(spec, "tydiqa", DATA, out, limit=1, batch_size=16, max_new_tokens=4, device="cpu")
    rec = outcome.record
    assert outcome.path == out / "eval/tydiqa-less/tydiqa.json"
    saved = json.loads(outcome.path.read_text())
    assert list(saved)[0] == "f1" and saved["languages"] and saved["model"]["name"] == "tydiqa-less"
    assert {k: rec[k] for k in ("model", "method", "target", "task", "metric")} == {
        "model": "tydiqa-less",
        "method": "less",
        "target": "tydiqa",
        "task": "tydiqa",
        "metric": "f1",
    }
    assert rec["score"] == pytest.approx(saved["f1"], abs=1e-3) and rec["lessctl_version"] and rec["time"]
    assert read_results(out) == [rec]
    assert HEADLINE == {"mmlu": "accuracy", "bbh": "exact_match", "tydiqa": "f1"}


# ---------------------------------------------------------------------------------------------- commands


def _lessctl(argv: list[str]) -> int:
    from lessctl.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture()
def workspace(tiny_dir, tmp_path) -> Path:
    toml = tmp_path / "lessctl.toml"
    toml.write_text(
        f'[experiment]\noutput_dir = "out"\n[model]\nname_or_path = "{tiny_dir}"\n'
        f'[data]\ndata_dir = "{DATA}"\n[eval]\nbatch_size = 16\n'
    )
    save_lora_adapter(tiny_dir, tmp_path / "out/finetune/tydiqa-less", run={"target": "tydiqa", "method": "less"})
    return toml


def test_eval_and_results_commands(workspace, capsys):
    cfg = ["--config", str(workspace)]
    argv = [*cfg, "eval", "--task", "tydiqa", "--task", "mmlu", "--limit", "1", "--device", "cpu"]
    assert _lessctl([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [rec, rec_mmlu] = out["results"]
    assert (rec["model"], rec["method"], rec["target"], rec["task"], rec["metric"]) == (
        "tydiqa-less",
        "less",
        "tydiqa",
        "tydiqa",
        "f1",
    )
    assert (rec_mmlu["task"], rec_mmlu["metric"], rec_mmlu["n"], rec_mmlu["limit"]) == ("mmlu", "accuracy", 57, 1)
    assert (workspace.parent / "out/eval/tydiqa-less/tydiqa.json").is_file()
    assert (workspace.parent / "out/eval/tydiqa-less/mmlu.json").is_file()

    assert _lessctl([*cfg, "eval", "--task", "tydiqa", "--model", "base", "--limit", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "tydiqa" in printed
    assert (workspace.parent / "out/eval/base/tydiqa.json").is_file()

    assert _lessctl([*cfg, "results", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)["results"]
    assert [(r["model"], r["task"]) for r in recs] == [
        ("tydiqa-less", "tydiqa"),
        ("tydiqa-less", "mmlu"),
        ("base", "tydiqa"),
    ]
    assert recs[2]["method"] is None and recs[2]["target"] is None

    assert _lessctl([*cfg, "results"]) == 0
    table = capsys.readouterr().out
    assert "tydiqa (f1)" in table and "mmlu (accuracy)" in table
    assert "tydiqa-less" in table


def test_eval_command_user_errors(workspace, capsys, tmp_path):
    cfg = ["--config", str(workspace)]
    assert _lessctl([*cfg, "eval", "--task", "mmlu", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data folder") and "eval/mmlu" in err[0]
    assert _lessctl([*cfg, "eval", "--task", "squad"]) == 2
    assert "unknown task 'squad'" in capsys.readouterr().err
    assert _lessctl([*cfg, "eval"]) == 2
    assert "eval needs --task" in capsys.readouterr().err
    assert _lessctl([*cfg, "results"]) == 0
    assert "no results in" in capsys.readouterr().err
