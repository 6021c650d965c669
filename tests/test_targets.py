"""Built-in LESS targets built from the real data against hand-written strings, and custom jsonl targets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lessctl.data.targets import TargetExample, load_target, subtask_indices, subtask_names, target_source_files
from lessctl.errors import ConfigError, InputError

DATA = Path(os.environ.get("LESSCTL_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"real data not found at {DATA}")


# ---------------------------------------------------------------------------------------------- MMLU


@needs_data
def test_mmlu_counts_and_subjects():
    ex = load_target("mmlu", DATA, "mmlu")
    assert len(ex) == 57 * 5
    names = subtask_names(ex)
    assert len(names) == 57
    assert names == sorted(names)
    assert names[0] == "abstract_algebra" and names[-1] == "world_religions"
    assert all(len(v) == 5 for v in subtask_indices(ex).values())
    assert all(e.completion in (" A", " B", " C", " D") for e in ex)


@needs_data
def test_mmlu_golden_prompt_tulu():
    first = load_target("mmlu", DATA, "mmlu")[0]
    assert first == TargetExample(
        prompt=(
            "<|user|>\n"
            "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
            "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
            "A. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
            "\n<|assistant|>\nThe answer is:"
        ),
        completion=" B",
        subtask="abstract_algebra",
    )


@needs_data
def test_mmlu_golden_prompt_plain_and_llama2():
    ex = load_target("mmlu", DATA, "mmlu", chat_format="plain")
    anatomy = [e for e in ex if e.subtask == "anatomy"][0]
    assert anatomy.prompt == (
        "The following are multiple choice questions (with answers) about  anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\n"
        "A. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\n"
        "C. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\n"
        "Answer:"
    )
    assert anatomy.completion == " D"
    llama = load_target("mmlu", DATA, "mmlu", chat_format="llama2")[0]
    assert llama.prompt.startswith("[INST] The following are multiple choice questions")
    assert llama.prompt.endswith("D. 3\nAnswer: [/INST] The answer is:")


# ---------------------------------------------------------------------------------------------- BBH


@needs_data
def test_bbh_counts_and_tasks():
    ex = load_target("bbh", DATA, "bbh")
    assert len(ex) == 27 * 3
    names = subtask_names(ex)
    shots = json.loads((DATA / "eval/bbh/bbh-three-shot.json").read_text())
    assert names == list(shots)  # the file's order
    assert names[0] == "date_understanding"
    assert all(len(v) == 3 for v in subtask_indices(ex).values())


@needs_data
def test_bbh_golden_prompt():
    raw = json.loads((DATA / "eval/bbh/bbh-three-shot.json").read_text())["date_understanding"]
    # The other two exemplars, as they stand in the file after the first one.
    icl = raw[raw.index("Q: Tomorrow is 11/12/2019.") :] + "\n\n"
    ex = load_target("bbh", DATA, "bbh")
    first = ex[0]
    assert first.subtask == "date_understanding"
    assert first.prompt == (
        "<|user|>\nInfer the date from context.\n\n"
        + icl
        + "Q: Today is Christmas Eve of 1937. What is the date 10 days ago in MM/DD/YYYY?\n"
        "Options:\n(A) 12/14/2026\n(B) 12/14/1950\n(C) 12/14/2007\n(D) 12/14/1937\n(E) 07/14/1938\n(F) 12/14/1988"
        "\n<|assistant|>\nA:"
    )
    assert first.completion == (
        " Let's think step by step.\n"
        "If today is Christmas Eve of 1937, then today's date is December 24, 1937. 10 days before today is "
        "December 14, 1937, that is 12/14/1937. So the answer is (D)."
    )
    # The last exemplar: the first two in context, in file order.
    third = ex[2]
    assert third.prompt.startswith("<|user|>\nInfer the date from context.\n\nQ: Today is Christmas Eve of 1937.")
    assert "So the answer is (D).\n\nQ: Tomorrow is 11/12/2019." in third.prompt
    assert third.prompt.endswith("(F) 12/03/1960\n<|assistant|>\nA:")
    assert third.completion.endswith("So the answer is (B).")


@needs_data
def test_bbh_task_prompt_with_blank_lines():
    # snarks' task description has a blank line inside: everything before the last 3 blocks is the task prompt.
    snarks = [e for e in load_target("bbh", DATA, "bbh") if e.subtask == "snarks"]
    assert len(snarks) == 3
    assert snarks[0].prompt.startswith(
        "<|user|>\nDetermine which of two sentences is sarcastic.\n\nAccording to Cambridge University Dictionary"
    )


@needs_data
def test_bbh_plain():
    first = load_target("bbh", DATA, "bbh", chat_format="plain")[0]
    assert first.prompt.startswith("Infer the date from context.\n\nQ: Tomorrow is 11/12/2019.")
    assert first.prompt.endswith("(F) 12/14/1988\nA:")


# ---------------------------------------------------------------------------------------------- TydiQA


@needs_data
def test_tydiqa_counts_and_languages():
    ex = load_target("tydiqa", DATA, "tydiqa")
    assert len(ex) == 9
    assert subtask_names(ex) == [
        "finnish",
        "telugu",
        "russian",
        "arabic",
        "indonesian",
        "english",
        "swahili",
        "korean",
        "bengali",
    ]


@needs_data
def test_tydiqa_golden_prompts():
    ex = {e.subtask: e for e in load_target("tydiqa", DATA, "tydiqa")}
    assert ex["english"].prompt == (
        "<|user|>\n"
        "Answer the following question based on the information in the given passage.Passage: "
        "Home Box Office (HBO) is an American premium cable and satellite television network that is owned by "
        "the namesake unit Home Box Office, Inc., a division of AT&T's WarnerMedia. The program which featured on "
        "the network consists primarily of theatrically released motion pictures and original television shows, "
        "along with made-for-cable movies, documentaries and occasional comedy and concert specials.\n"
        "Question: Who owns HBO?\n"
        "<|assistant|>\nAnswer:"
    )
    assert ex["english"].completion == " Home Box Office"
    assert ex["finnish"].prompt == (
        "<|user|>\n"
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.Kappale:  Vuodesta 2006 alkaen Ruanda "
        "on jaettu neljään maakuntaan, Pohjoinen, Etelä, Itä ja Länsi. Lisäksi pääkaupunki Kigali muodostaa oman "
        "hallintoalueensa.[2]\nKysymys: Mikä on Ruandan pääkaupunki?\n<|assistant|>\nVastaus:"
    )
    assert ex["finnish"].completion == " Kigali"
    plain = {e.subtask: e for e in load_target("tydiqa", DATA, "tydiqa", chat_format="plain")}
    assert plain["english"].prompt == ex["english"].prompt[len("<|user|>\n") :].replace("<|assistant|>\n", "")


@needs_data
def test_source_files():
    files = target_source_files("mmlu", DATA)
    assert len(files) == 57 and all(f.is_file() for f in files)
    assert files[0].name == "abstract_algebra_dev.csv"
    assert target_source_files("bbh", DATA) == [DATA / "eval/bbh/bbh-three-shot.json"]
    assert target_source_files("tydiqa", DATA) == [DATA / "eval/tydiqa/tydiqa-one-shot.json"]
    assert target_source_files({"file": "x.jsonl"}, DATA, root=Path("/r")) == [Path("/r/x.jsonl")]


@needs_data
def test_data_dir_may_be_the_eval_folder():
    assert len(load_target("tydiqa", DATA / "eval", "tydiqa")) == 9


# ---------------------------------------------------------------------------------------------- custom


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_custom_messages_and_prompt_completion(tmp_path):
    f = _write(
        tmp_path / "t.jsonl",
        [
            {"messages": [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello! "}]},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A2"},
                ],
                "subtask": "multi",
            },
            {"prompt": "2+2=", "completion": "4"},
            {"prompt": "Say hi:\n", "completion": "hi", "subtask": "multi"},
        ],
    )
    tok = SimpleNamespace(eos_token="</s>", bos_token="<s>")
    ex = load_target({"file": "t.jsonl"}, tmp_path / "nodata", "mine", root=tmp_path, tokenizer=tok)
    assert ex[0] == TargetExample("<|user|>\nHi there\n<|assistant|>\n", "Hello!", "mine")
    assert ex[1] == TargetExample(
        "<|system|>\nBe brief.\n<|user|>\nQ1\n<|assistant|>\nA1</s>\n<|user|>\nQ2\n<|assistant|>\n", "A2", "multi"
    )
    assert ex[2] == TargetExample("2+2=", " 4", "mine")  # a space at the join, as in training
    assert ex[3] == TargetExample("Say hi:\n", "hi", "multi")
    assert subtask_names(ex) == ["mine", "multi"]
    assert subtask_indices(ex) == {"mine": [0, 2], "multi": [1, 3]}

    # The training text (lessctl.data's llama2 format) cut before the last reply, which keeps its space.
    llama = load_target({"file": str(f)}, tmp_path, "mine", chat_format="llama2", tokenizer=tok)
    assert llama[1].prompt == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    assert llama[1].completion == " A2"
    assert llama[0] == TargetExample("<s>[INST] Hi there [/INST]", " Hello!", "mine")
    plain = load_target({"file": str(f)}, tmp_path, "mine", chat_format="plain")
    # prompt + completion is the start of the training text of the same conversation.
    from lessctl.data.encoding import format_chat

    for fmt, exs in (("tulu", ex), ("llama2", llama)):
        for rec, e in zip(json.loads("[" + ",".join(f.read_text().splitlines()[:2]) + "]"), exs):
            assert format_chat(rec["messages"], tok, fmt).startswith(e.prompt + e.completion)
    assert plain[1] == TargetExample("Be brief.\n\nQ1\n\nA1\n\nQ2\n\n", "A2", "multi")


def test_custom_subtask_key(tmp_path):
    _write(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b", "topic": "x"}, {"prompt": "c", "completion": "d"}])
    ex = load_target({"file": "t.jsonl", "subtask_key": "topic"}, tmp_path, "mine", root=tmp_path)
    assert [e.subtask for e in ex] == ["x", "mine"]


@pytest.mark.parametrize(
    "lines, match",
    [
        (["{not json"], r"t\.jsonl:1: invalid JSON"),
        ([{"prompt": "a", "completion": "b"}, {"text": "x"}], r"t\.jsonl:2: expected"),
        ([{"messages": [{"role": "user", "content": "q"}]}], r"t\.jsonl:1: the last message must be the assistant"),
        ([{"messages": [{"role": "bot", "content": "q"}]}], r"t\.jsonl:1: messages must be"),
        ([], r"t\.jsonl: no examples"),
    ],
)
def test_custom_errors(tmp_path, lines, match):
    _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(InputError, match=match):
        load_target({"file": "t.jsonl"}, tmp_path, "mine", root=tmp_path)


def test_errors_name_path_and_layout(tmp_path):
    with pytest.raises(InputError, match=r"missing.jsonl: no such file; expected one JSON object a line"):
        load_target({"file": str(tmp_path / "missing.jsonl")}, tmp_path, "x")
    with pytest.raises(InputError, match=r"does not exist; expected a LESS-layout folder"):
        load_target("mmlu", tmp_path / "nope", "mmlu")
    with pytest.raises(InputError, match=r"no bbh data in .*eval/bbh"):
        load_target("bbh", tmp_path, "bbh")
    (tmp_path / "eval" / "tydiqa").mkdir(parents=True)
    with pytest.raises(InputError, match=r"tydiqa-one-shot.json: no such file; expected"):
        load_target("tydiqa", tmp_path, "tydiqa")
    with pytest.raises(ConfigError, match="unknown built-in target 'mmlux'"):
        load_target("mmlux", tmp_path, "t")
    with pytest.raises(ConfigError, match="unknown chat format"):
        load_target("mmlu", tmp_path, "t", chat_format="chatml")


def test_malformed_builtin_files(tmp_path):
    (tmp_path / "eval/mmlu/test").mkdir(parents=True)
    (tmp_path / "eval/mmlu/dev").mkdir(parents=True)
    (tmp_path / "eval/mmlu/test/algebra_test.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "eval/mmlu/dev/algebra_dev.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,E\n")
    with pytest.raises(InputError, match=r"algebra_dev.csv: row 2 .* expected a headerless MMLU csv"):
        load_target("mmlu", tmp_path, "mmlu")
    (tmp_path / "eval/bbh").mkdir(parents=True)
    (tmp_path / "eval/bbh/bbh-three-shot.json").write_text('{"t": "only a prompt"}')
    with pytest.raises(InputError, match=r"task 't' does not end in three exemplars"):
        load_target("bbh", tmp_path, "bbh")
