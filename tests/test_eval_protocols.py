"""The evaluation protocols of LESS's open-instruct scripts, from their definitions: BBH's answer and blank-line
stop, TydiQA's demonstrations and seeded sample, MMLU's carried shot count; golden prompts of real examples."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from eval_helpers import DATA, build_model_dir

from lessctl.evaluation import bbh, mmlu, tydiqa
from lessctl.evaluation.generation import cut_at_stop
from lessctl.evaluation.metrics import extract_bbh_answer

needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"real data not found at {DATA}")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny evaluation model (a random 2-layer Llama with a tokenizer trained on the evaluation texts)."""
    from lessctl.models import load_model_for_eval

    if not (DATA / "eval").is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return load_model_for_eval(build_model_dir(tmp_path_factory.mktemp("tiny") / "base"), device="cpu")


@needs_data
def test_bbh_cot_prompt_is_less_file_text_after_its_two_header_lines():
    """LESS reads a cot-prompts file as "".join(lines[2:]) (the canary line and the rule dropped), then strips it."""
    files = sorted((DATA / "eval/bbh/cot-prompts").glob("*.txt"))
    assert len(files) == 27
    for f in files:
        with open(f, encoding="utf-8") as fh:
            want = "".join(fh.readlines()[2:]).strip()
        assert bbh.read_cot_prompt(f) == want, f.name


@needs_data
def test_bbh_answer_at_the_blank_line_is_the_full_generation_answer():
    """LESS generates the full 512 tokens (its stop sequence never triggers) and takes the first "So the answer is
    (.*?)." of all of it; lessctl stops at the first blank line. A model continuing a real 3-shot prompt writes its
    answer, then, as the exemplars taught it, further "Q: ... A: ..." blocks with their own answers: built here
    from each task's own exemplars, the answer extracted from the stopped text is the full generation's."""
    tasks = sorted(p.stem for p in (DATA / "eval/bbh/cot-prompts").glob("*.txt"))
    for task in tasks:
        cot = bbh.read_cot_prompt(DATA / f"eval/bbh/cot-prompts/{task}.txt")
        question = json.loads((DATA / f"eval/bbh/bbh/{task}.json").read_text())["examples"][0]["input"]
        prompt = bbh.build_prompt(cot, question)
        assert prompt.endswith("\n\nQ: " + question + "\nA:")
        exemplars = cot.split("\n\nQ: ")[1:]  # "question\nA: answer" of each shot
        answers = [e.split("\nA:", 1)[1] for e in exemplars]
        full = answers[0] + "".join("\n\nQ: " + e for e in exemplars[1:]) + "\n\nQ: " + question + "\nA:" + answers[2]
        stopped = cut_at_stop(full, bbh.STOP)
        assert stopped == answers[0] and len(stopped) < len(full)
        assert extract_bbh_answer(stopped) == extract_bbh_answer(full), task
        assert extract_bbh_answer(full) == re.search(r"So the answer is (.*?)\.", full).group(1).strip()


def test_bbh_answer_differs_only_when_the_first_paragraph_has_no_answer():
    """Where the first paragraph lacks "So the answer is X." LESS's full generation takes the answer of a later,
    invented question, and lessctl the first paragraph: the documented difference."""
    full = "Let's think step by step. It is (A)\n\nQ: another question\nA: Let's think. So the answer is (C)."
    assert extract_bbh_answer(full) == "(C)"
    assert extract_bbh_answer(cut_at_stop(full, bbh.STOP)) == "Let's think step by step. It is (A)"


@needs_data
def test_bbh_sample_is_less_draw_in_sorted_task_order():
    """LESS: random.seed(42) once, then random.sample(examples, 40) for each task file in glob order
    (evaluation/eval/bbh/run_eval.py). With the listing sorted every one of the 27 x 40 examples is LESS's, in
    LESS's order, whichever tasks are evaluated; "per_task" keeps the sample seeded per (seed, task)."""
    import glob
    import os
    import random

    root = DATA / "eval/bbh"
    random.seed(42)
    want = {}
    for task_file in sorted(glob.glob(os.path.join(root, "bbh", "*.json"))):
        with open(task_file) as f:
            want[os.path.basename(task_file).split(".")[0]] = random.sample(json.load(f)["examples"], 40)
    tasks = bbh.bbh_tasks(root)
    assert len(want) == 27 and list(want) == tasks
    assert bbh.select_examples(root, tasks, tasks, 40) == want
    last = tasks[-1:]  # its sample follows the draws of the 26 tasks before it
    assert bbh.select_examples(root, tasks, last, 40) == {last[0]: want[last[0]]}
    per_task = bbh.select_examples(root, tasks, tasks, 40, sample="per_task")
    assert per_task[last[0]] == bbh.sample_examples(
        json.loads((root / "bbh" / f"{last[0]}.json").read_text())["examples"], last[0], 40, 42
    )
    assert sum(a == b for t in tasks for a, b in zip(per_task[t], want[t])) < 27 * 40 // 4  # another draw


def test_bbh_generation_opening_with_a_blank_line_is_read_on_as_less_does(tiny):
    """LESS strips a generation and reads its first paragraph (or its "So the answer is X."): a continuation that
    opens with blank lines is not an empty answer. The stop check, fed a real tokenizer's tokens one at a time
    as generation feeds them, stops each row at the first blank line after its first text, and the answer of
    the cut text is LESS's answer of the whole text."""
    import torch

    from lessctl.evaluation.stops import StopOnTokenIds

    _, tok = tiny
    texts = [
        "\n\nLet's think step by step. So the answer is (B).\n\nQ: next\nA: So the answer is (C).",
        "\n\n\n  It is 7\n\nQ: more",
        " Plain. So the answer is True.\n\nQ: again",
        "\n\n",
    ]
    prompt = tok.encode("Q: a question\nA:", add_special_tokens=False)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        stops = {}
        for after_text in (False, True):
            crit = StopOnTokenIds(tok, bbh.STOP, len(prompt), after_text=after_text)
            stops[after_text] = next(
                (k for k in range(1, len(ids) + 1) if crit(torch.tensor([prompt + ids[:k]]), None)[0]), None
            )
        # the reference: the first prefix whose decoded text (stripped of its leading blanks) holds a blank line
        prefix = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
        first = next((k for k in range(1, len(ids) + 1) if "\n\n" in prefix[k].lstrip()), None)
        assert stops[True] == first, text
        cut = cut_at_stop(prefix[first or len(ids)], bbh.STOP, after_text=True)
        full = tok.decode(ids, skip_special_tokens=True)
        less = re.search(r"So the answer is (.*?)\.", full)
        less_answer = less.group(1).strip() if less else full.strip().split("\n\n")[0].strip()
        if text.startswith("\n\n"):
            assert stops[False] is not None and stops[False] < (first or len(ids) + 1)  # the old stop: at once
            assert extract_bbh_answer(cut_at_stop(full, bbh.STOP)) == ""
        assert extract_bbh_answer(cut) == less_answer, text
    assert extract_bbh_answer(cut_at_stop("\n\nIt is 7\n\nQ: x", bbh.STOP, after_text=True)) == "It is 7"


def write_tydiqa(root: Path, dev: list[dict], shots: dict[str, list[dict]]) -> Path:
    d = root / "eval" / "tydiqa"
    d.mkdir(parents=True)
    paras = [
        {"context": ex["context"], "qas": [{"id": ex["id"], "question": ex["question"], "answers": ex["answers"]}]}
        for ex in dev
    ]
    (d / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps({"data": [{"paragraphs": paras}]}))
    (d / "tydiqa-one-shot.json").write_text(json.dumps(shots))
    return root


def _qa(lang: str, i: int) -> dict:
    return {
        "id": f"{lang}-{i}",
        "context": f"Passage {i} says the answer is a{i}.",
        "question": f"What is q{i}?",
        "answers": [{"text": f"a{i}", "answer_start": 0}],
    }


def test_tydiqa_demonstration_is_never_the_question_itself(tmp_path):
    dev = [_qa("english", i) for i in range(3)]
    shots = {"english": [{k: v for k, v in _qa("english", i).items() if k != "id"} for i in (0, 1)]}
    root = write_tydiqa(tmp_path, dev, shots)
    pool, path = tydiqa.read_exemplars(root / "eval/tydiqa")
    assert path.name == "tydiqa-one-shot.json" and [s["question"] for s in pool["english"]] == [
        "What is q0?",
        "What is q1?",
    ]
    picks = [tydiqa.pick_demonstration(pool["english"], ex, "english", 42)["question"] for ex in read_dev_plain(root)]
    first = tydiqa.pick_demonstration(pool["english"], {"id": "x", "question": "none"}, "english", 42)["question"]
    other = ({"What is q0?", "What is q1?"} - {first}).pop()
    # one demonstration for the language (seeded), except for the question that is that demonstration
    assert picks == [other if q == first else first for q in ("What is q0?", "What is q1?", "What is q2?")]
    assert all(p != q for p, q in zip(picks, ("What is q0?", "What is q1?", "What is q2?")))
    only = [{k: v for k, v in _qa("english", 0).items() if k != "id"}]
    assert tydiqa.pick_demonstration(only, dev[0], "english", 42) is None


def read_dev_plain(root: Path) -> list[dict]:
    return tydiqa.read_dev(root / "eval/tydiqa/tydiqa-goldp-v1.1-dev.json")


def test_tydiqa_caps_each_language_at_a_seeded_200(tmp_path):
    dev = [_qa("english", i) for i in range(250)] + [_qa("finnish", i) for i in range(30)]
    root = write_tydiqa(tmp_path, dev, {})
    rows = read_dev_plain(root)
    a = tydiqa.sample_questions(rows, tydiqa.QUESTIONS_PER_LANGUAGE, 42)
    en = [ex["id"] for ex in a if ex["lang"] == "english"]
    assert len(en) == 200 and len(set(en)) == 200
    assert [ex["id"] for ex in a if ex["lang"] == "finnish"] == [f"finnish-{i}" for i in range(30)]  # fewer: all
    assert en == sorted(en, key=lambda x: int(x.split("-")[1]))  # kept in file order
    assert a == tydiqa.sample_questions(rows, 200, 42) and a != tydiqa.sample_questions(rows, 200, 43)
    # the sample of a language depends on the seed and the language only
    assert [ex for ex in tydiqa.sample_questions(rows[:250], 200, 42)] == [ex for ex in a if ex["lang"] == "english"]
    assert len(tydiqa.sample_questions(rows, None, 42)) == 280


@needs_data
def test_tydiqa_golden_prompt_without_its_own_demonstration(tiny):
    """The shared dev file holds only the one-shot exemplars: each question's only exemplar is itself, so
    it runs without a demonstration (LESS would show the question with its answer)."""
    _, tok = tiny
    root = DATA / "eval/tydiqa"
    pool, _ = tydiqa.read_exemplars(root)
    en = [ex for ex in tydiqa.read_dev(root / "tydiqa-goldp-v1.1-dev_ini.json") if ex["lang"] == "english"][0]
    assert tydiqa.pick_demonstration(pool["english"], en, "english", 42) is None
    prompt = tydiqa.build_prompt("english", None, en["context"], en["question"])
    assert prompt == (
        "<|user|>\nAnswer the following question based on the information in the given passage.\n\n"
        "Passage: Home Box Office (HBO) is an American premium cable and satellite television network that is owned "
        "by the namesake unit Home Box Office, Inc., a division of AT&T's WarnerMedia. The program which featured on "
        "the network consists primarily of theatrically released motion pictures and original television shows, "
        "along with made-for-cable movies, documentaries and occasional comedy and concert specials.\n"
        "Question: Who owns HBO?\n\n<|assistant|>\nAnswer:"
    )


def test_tydiqa_context_cut_has_no_literal_bos(tiny):
    _, tok = tiny
    ctx = "apple river stone " * 200
    cut = tydiqa.trim_context(tok, ctx, 20)
    assert "<s>" not in cut and ctx.startswith(cut.strip()[:10])
    assert len(tok.encode(cut, add_special_tokens=False)) <= 21


def test_tydiqa_context_keeps_less_length(tiny):
    """LESS: ids = tokenizer.encode(context) (with the BOS); when len(ids) > max_context_length (512), context =
    tokenizer.decode(ids[:512]): the BOS, shown as a literal "<s>", and 511 tokens of text. lessctl keeps the
    same 511 tokens, without the "<s>"; a context of exactly 511 tokens of text is not cut."""
    _, tok = tiny
    assert tok.encode("x")[0] == tok.bos_token_id  # the Llama-style tokenizer adds a BOS, as Llama's does
    ctx = " ".join(f"word{i % 97} stone river" for i in range(400))
    less = tok.decode(tok.encode(ctx)[:512])  # LESS's line
    assert less.startswith(tok.bos_token)
    cut = tydiqa.trim_context(tok, ctx, 512)
    assert cut == less[len(tok.bos_token) :]
    assert len(tok.encode(cut, add_special_tokens=False)) == 511
    ids = tok.encode(ctx, add_special_tokens=False)
    fits = tok.decode(ids[:511])
    assert len(tok.encode(fits)) == 512 and tydiqa.trim_context(tok, fits, 512) == fits


@needs_data
def test_mmlu_shot_count_carries_over_within_a_subject(tiny):
    """open-instruct's run_eval.py: k starts at 5 per subject and, question after question, drops while the prompt
    (tokens without special tokens) is over the limit; it is never raised again within the subject."""
    model, tok = tiny
    subject = "high_school_european_history"
    with open(DATA / f"eval/mmlu/dev/{subject}_dev.csv", newline="") as fh:
        dev = list(csv.reader(fh))
    with open(DATA / f"eval/mmlu/test/{subject}_test.csv", newline="") as fh:
        rows = list(csv.reader(fh))[:12]

    def length(row, k):
        return len(tok(mmlu.build_prompt(subject, dev, row, k), add_special_tokens=False)["input_ids"])

    def carried(cap):  # the definition: k is carried from question to question
        k, out = 5, []
        for row in rows:
            while length(row, k) > cap and k > 0:
                k -= 1
            out.append(k)
        return out

    def reset(cap):  # every question from 5 again
        return [max([k for k in range(6) if length(row, k) <= cap] or [0]) for row in rows]

    caps = sorted({length(row, k) for row in rows for k in range(6)})
    cap = next(c for c in caps if carried(c) != reset(c))  # a limit at which carrying the count matters
    want = carried(cap)
    assert min(want) >= 0 and want != reset(cap)
    res = mmlu.evaluate_mmlu(model, tok, DATA, limit=12, subjects=[subject], max_prompt_tokens=cap, batch_size=16)
    assert [p["shots"] for p in res["predictions"]] == want
    assert res["settings"]["prompts_with_fewer_shots"] == sum(k < 5 for k in want)


@needs_data
def test_mmlu_choices_pandas_reads_as_nan_are_shown_as_nan():
    """LESS reads the MMLU csv files with pandas (pd.read_csv(header=None)), which reads a cell "None" (and its
    other default NA strings) as NaN, and formats it "nan": choice A of 10 of the 14,042 test questions."""
    subjects = sorted(p.name[: -len("_test.csv")] for p in (DATA / "eval/mmlu/test").glob("*_test.csv"))
    shown = []
    for subject in subjects:
        for row in mmlu.read_mmlu_csv(DATA / f"eval/mmlu/test/{subject}_test.csv"):
            prompt = mmlu.build_prompt(subject, [], row, 0)
            for letter, choice in zip("ABCD", row[1:5]):
                if choice == "None":
                    assert f"\n{letter}. nan\n" in prompt and f"\n{letter}. None\n" not in prompt
                    shown.append((subject, letter))
    assert len(shown) == 10 and {s for s, _ in shown} == {
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "electrical_engineering",
    }
    from lessctl.data.targets import PANDAS_NA, mmlu_question

    assert mmlu_question(["q", "None", "NA", "", "x", "A"], False) == "q\nA. nan\nB. nan\nC. nan\nD. x\nAnswer:"
    assert "None" in PANDAS_NA and "none" not in PANDAS_NA and " None" not in PANDAS_NA


@needs_data
def test_mmlu_golden_prompt_of_a_real_question():
    root = DATA / "eval/mmlu"
    with open(root / "dev/anatomy_dev.csv", newline="") as fh:
        dev = list(csv.reader(fh))
    with open(root / "test/anatomy_test.csv", newline="") as fh:
        row = next(csv.reader(fh))
    prompt = mmlu.build_prompt("anatomy", dev, row, 1)
    assert prompt == (
        "The following are multiple choice questions (with answers) about  anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\nAnswer: D\n\n"
        "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
        "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
        "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:"
    )
