"""Generation with token-id stop checks gives the text of plain `model.generate` with a stop check on decoded text."""

from __future__ import annotations

import json

import pytest
from eval_helpers import DATA, build_model_dir

from lessctl._reference import text_stop_generate
from lessctl.evaluation import bbh, tydiqa
from lessctl.evaluation.generation import generate_greedy
from lessctl.evaluation.stops import StopOnTokenIds, candidate_table

needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"real data not found at {DATA}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lessctl.models import load_model_for_eval

    if not (DATA / "eval").is_dir():  # the tokenizer is trained on the real prompts
        pytest.skip(f"real data not found at {DATA}")

    return load_model_for_eval(build_model_dir(tmp_path_factory.mktemp("tiny") / "base"), device="cpu")


def bbh_prompts(n_tasks: int, per_task: int) -> list[str]:
    root = DATA / "eval/bbh"
    out = []
    for task in bbh.bbh_tasks(root)[:n_tasks]:
        cot = bbh.read_cot_prompt(root / "cot-prompts" / f"{task}.txt")
        examples = json.loads((root / "bbh" / f"{task}.json").read_text(encoding="utf-8"))["examples"]
        out += [bbh.build_prompt(cot, ex["input"]) for ex in bbh.sample_examples(examples, task, per_task, 42)]
    return out


def tydiqa_prompts(tok) -> list[str]:
    root = DATA / "eval/tydiqa"
    shots = tydiqa.read_shots(root / "tydiqa-one-shot.json")
    out = []
    for ex in tydiqa.read_dev(tydiqa.dev_file(root)):
        shot = dict(shots[ex["lang"]], context=tydiqa.trim_context(tok, shots[ex["lang"]]["context"], 100))
        out.append(tydiqa.build_prompt(ex["lang"], shot, tydiqa.trim_context(tok, ex["context"], 100), ex["question"]))
    return out


def test_candidate_table_marks_the_tokens_that_end_a_stop(tiny):
    _, tok = tiny
    table = candidate_table(tok, ["\n\n"])
    texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
    assert table.shape == (len(tok),) and table.any()
    assert [bool(x) for x in table] == ["\n" in t for t in texts]
    assert candidate_table(tok, ["\n\n"]) is table  # built once per tokenizer
    assert candidate_table(tok, ["end "]) is None  # a space may hide in a token's leading marker: no table


def stops_from(outputs: list[str]) -> list[str]:
    """Stop strings that the continuations really produce: two characters from the middle of a few of them."""
    out = []
    for text in outputs:
        for k in range(2, max(2, len(text) - 2)):
            s = text[k : k + 2]
            if s.isascii() and s[-1] != " " and s.strip():
                out.append(s)
                break
        if len(out) == 3:
            break
    return out


@needs_data
@pytest.mark.parametrize("task", ["bbh", "tydiqa"])
def test_token_id_stops_give_the_text_of_decoded_stops(tiny, task):
    model, tok = tiny
    if task == "bbh":
        prompts, harness_stop, new = bbh_prompts(6, 3), bbh.STOP, 40
    else:
        prompts, harness_stop, new = tydiqa_prompts(tok), tydiqa.STOP, 24
    free = text_stop_generate(model, tok, prompts, max_new_tokens=new, batch_size=5)
    mid = stops_from(free)
    assert len(mid) == 3, free
    # the harness's own stops, stops the outputs really hit, and one checked on text at every step
    for stop in (list(harness_stop), mid, mid + [" x"]):
        ref = text_stop_generate(model, tok, prompts, max_new_tokens=new, stop=stop, batch_size=5)
        got, _ = generate_greedy(model, tok, prompts, max_new_tokens=new, stop=stop, batch_size=5)
        assert got == ref, stop
    # the static cache: every batch padded to one width, the last one filled up to the batch size
    got, _ = generate_greedy(model, tok, prompts, max_new_tokens=new, stop=mid, batch_size=5, cache="static")
    assert got == text_stop_generate(model, tok, prompts, max_new_tokens=new, stop=mid, batch_size=5)
    assert sum(r != f for r, f in zip(ref, free)) >= 3  # the stops did cut outputs


@needs_data
def test_text_is_decoded_only_for_rows_whose_last_token_may_end_a_stop(tiny):
    model, tok = tiny
    prompts = bbh_prompts(2, 2)
    import torch
    from transformers import StoppingCriteriaList

    from lessctl.evaluation.generation import _left_pad, encode

    ids, mask, _ = _left_pad([encode(tok, p)[-200:] for p in prompts], tok.pad_token_id, "cpu")
    crit = StopOnTokenIds(tok, ["\n\n"], ids.shape[1])
    with torch.inference_mode():
        seqs = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=30,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([crit]),
        )
    table = candidate_table(tok, ["\n\n"])
    new = seqs[:, ids.shape[1] :]
    assert crit.steps == new.shape[1]
    assert crit.checks == int(table[new].sum())  # the rows checked are the candidate tokens, and only those
    assert crit.checks < crit.steps * len(prompts)


def test_auto_cache_is_dynamic_on_the_cpu_and_a_bad_cache_is_refused(tiny_template, cli, tmp_path):
    """`[eval] kv_cache = "auto"` (the default) picks the static cache on a GPU only; a bad value is one line."""
    import pytest

    from lessctl.evaluation.generation import generate_greedy
    from lessctl.models import load_model_for_eval

    model, tok = load_model_for_eval(tiny_template / "model", device="cpu")
    prompts = ["Q: 1 + 1 =", "Q: sort 3 1 2 ->", "a longer prompt about antonyms: hot ->"]
    auto, _ = generate_greedy(model, tok, prompts, max_new_tokens=8, stop=("\n",), batch_size=2, cache="auto")
    dyn, _ = generate_greedy(model, tok, prompts, max_new_tokens=8, stop=("\n",), batch_size=2, cache="dynamic")
    assert auto == dyn
    with pytest.raises(ValueError, match="cache"):
        generate_greedy(model, tok, prompts, max_new_tokens=2, cache="fast")
    r = cli("--config", tiny_template / "lessctl.toml", "eval", "--task", "bbh", "--kv-cache", "fast")
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and len(errors) == 1 and "--kv-cache" in errors[0] and "static" in errors[0], r
