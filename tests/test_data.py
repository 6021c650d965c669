"""Tests for data.py: golden chat encodings and label masks (LESS.md section 1), validation, the warmup subset."""

import json

import numpy as np
import pytest

from lessctl.data.encoding import (
    IGNORE_INDEX,
    encode_messages,
    encode_prompt_completion,
    encode_record,
    format_chat,
    join_prompt_completion,
)
from lessctl.data.pool import Pool, build_training_set, subset_indices
from lessctl.data.records import Record, read_jsonl
from lessctl.errors import InputError

CONVERSATION = [
    {"role": "system", "content": "  You are terse.\n"},  # content is stripped
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Reverse these words: apple river"},
    {"role": "assistant", "content": " river apple "},
]
# Written out by hand from LESS.md section 1.
CONVERSATION_TULU = (
    "<|system|>\nYou are terse.\n"
    "<|user|>\nWhat is 2 plus 3?\n"
    "<|assistant|>\n2 + 3 = 5.</s>\n"
    "<|user|>\nReverse these words: apple river\n"
    "<|assistant|>\nriver apple</s>\n"
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    from lessctl.tiny import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="module")
def tok(tiny_data, tmp_path_factory):
    """The tiny preset's tokenizer (built exactly as `init --preset tiny` builds it), loaded like a user's."""
    from lessctl.models import load_tokenizer
    from lessctl.tiny import corpus_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = corpus_texts(list(tiny_data["train"].values()) + list(tiny_data["targets"].values()))
    train_tokenizer(texts, out)
    return load_tokenizer(out)


# --------------------------------------------------------------------------- an independent reference


def tulu_piece(m: dict) -> str:
    c = m["content"].strip()
    if m["role"] == "assistant":
        return f"<|assistant|>\n{c}</s>\n"
    return f"<|{m['role']}|>\n{c}\n"


def tulu_concat(messages: list[dict]) -> str:
    return "".join(tulu_piece(m) for m in messages)


def n_tokens(tok, text: str, max_len: int) -> int:
    return len(tok(text, max_length=max_len, truncation=True)["input_ids"])


def reference_tulu(tok, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """LESS.md section 1, message by message: mask [len(tok(before)), len(tok(through [+ marker])))."""
    ids = tok(tulu_concat(messages), max_length=max_len, truncation=True)["input_ids"]
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else n_tokens(tok, tulu_concat(messages[:i]), max_len)
        through = tulu_concat(messages[: i + 1])
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            through += "<|assistant|>\n"
        end = n_tokens(tok, through, max_len)
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= max_len:
            break
    return ids, labels


def trained_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each maximal run of trained (unmasked) tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i, "a trained label must equal its input id"
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# --------------------------------------------------------------------------- tulu


def test_tulu_text_is_the_hand_written_string(tok):
    assert format_chat(CONVERSATION, tok, "tulu") == CONVERSATION_TULU


def test_tulu_golden_encoding(tok):
    ids, labels = encode_messages(CONVERSATION, tok, 2048, "tulu")
    assert ids == tok(CONVERSATION_TULU)["input_ids"]  # the whole text tokenized once, default special tokens
    assert ids[0] == tok.bos_token_id
    ref_ids, ref_labels = reference_tulu(tok, CONVERSATION, 2048)
    assert ids == ref_ids
    assert labels == ref_labels
    # Trained: exactly the assistant contents, each with eos and the newline; markers are masked.
    assert trained_runs(tok, ids, labels) == ["2 + 3 = 5.</s>\n", "river apple</s>\n"]
    masked_text = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX], skip_special_tokens=True)
    assert masked_text == (
        "<|system|>\nYou are terse.\n<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n"
        "<|user|>\nReverse these words: apple river\n<|assistant|>\n"
    )
    # The assistant marker just before each answer is masked.
    starts = [k for k in range(1, len(labels)) if labels[k - 1] == IGNORE_INDEX and labels[k] != IGNORE_INDEX]
    assert len(starts) == 2
    for k in starts:
        assert tok.decode(ids[k - 4 : k]) == "<|assistant|>\n"


def test_tulu_truncated_inside_the_second_answer(tok):
    full_ids, full_labels = encode_messages(CONVERSATION, tok, 2048, "tulu")
    second_start = max(
        i for i in range(1, len(full_labels)) if full_labels[i - 1] == IGNORE_INDEX and full_labels[i] != IGNORE_INDEX
    )
    max_len = second_start + 2
    ids, labels = encode_messages(CONVERSATION, tok, max_len, "tulu")
    assert len(ids) == max_len and ids == full_ids[:max_len]
    assert (ids, labels) == reference_tulu(tok, CONVERSATION, max_len)
    assert labels == full_labels[:max_len]
    assert labels[-2:] == ids[-2:]


def test_tulu_truncated_before_the_answer_has_no_labels(tok):
    long_user = [
        {"role": "user", "content": "Reverse these words: " + " ".join(["apple river stone cloud"] * 20)},
        {"role": "assistant", "content": "cloud stone river apple"},
    ]
    ids, labels = encode_messages(long_user, tok, 16, "tulu")
    assert len(ids) == 16
    assert labels == [IGNORE_INDEX] * 16
    assert (ids, labels) == reference_tulu(tok, long_user, 16)
    enc = encode_record(Record(0, json.dumps({"messages": long_user}), {"messages": long_user}), tok, 16)
    assert enc.n_label_tokens == 0


def test_fully_masked_examples_are_dropped_and_counted(tok, tmp_path, caplog):
    short = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    long = {
        "messages": [
            {"role": "user", "content": "Count the words: " + "apple " * 60},
            {"role": "assistant", "content": "There are 60 words."},
        ]
    }
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (short, long, short)) + "\n")
    out, counts = build_training_set({"pool": f}, tok, 24, "tulu", 1.0, 3)
    assert counts == {"pool": 3, "subset": 3, "dropped_no_labels": 1}
    assert [e.line for e in out] == [0, 2]  # the long one is not trained on
    assert all(e.n_label_tokens > 0 and e.source == "pool" for e in out)
    from lessctl.errors import LogFormatter

    (rec,) = [r for r in caplog.records if "no trainable tokens" in r.getMessage()]
    assert LogFormatter("%(name)s: %(message)s").format(rec) == (
        "warning: 1 of 3 examples have no trainable tokens after truncation and were skipped"
    )


# --------------------------------------------------------------------------- prompt/completion


@pytest.mark.parametrize(
    "prompt, completion, text",
    [
        ("Q: add 2 and 3.", "5", "Q: add 2 and 3. 5"),  # no whitespace at the join: one space
        ("Q: add 2 and 3. ", "5", "Q: add 2 and 3. 5"),
        ("Q: add 2 and 3.", " 5", "Q: add 2 and 3. 5"),
        ("Q: add 2 and 3.\n", "5", "Q: add 2 and 3.\n5"),
        ("Q: add 2 and 3.", "\n5", "Q: add 2 and 3.\n5"),
        ("Q:\t", "5", "Q:\t5"),
    ],
)
def test_prompt_completion_join_rule(prompt, completion, text):
    assert join_prompt_completion(prompt, completion) == text


def test_prompt_completion_encoding(tok):
    prompt, completion = "What is the opposite of hot?", "The opposite of hot is cold."
    ids, labels = encode_prompt_completion(prompt, completion, tok, 2048)
    assert ids == tok(prompt + " " + completion + "</s>")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    n_prompt = len(tok(prompt)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert trained_runs(tok, ids, labels) == [" The opposite of hot is cold.</s>"]
    rec = Record(4, "", {"prompt": prompt, "completion": completion, "id": "x"})
    enc = encode_record(rec, tok, 2048, source="pc")
    assert (enc.input_ids, enc.labels, enc.line, enc.source) == (ids, labels, 4, "pc")


# --------------------------------------------------------------------------- llama-2


def test_llama2_text_and_labels(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " What is 2 plus 3? "},
        {"role": "assistant", "content": "2 + 3 = 5."},
    ]
    text = format_chat(msgs, tok, "llama2")
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 3? [/INST] 2 + 3 = 5. </s>"
    ids, labels = encode_messages(msgs, tok, 2048, "llama2")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the text's <s>, not a second one
    assert tok.decode(ids) == text
    assert trained_runs(tok, ids, labels) == [" 2 + 3 = 5. </s>"]


def test_llama2_multi_turn(tok):
    msgs = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Add 4 and 4."},
        {"role": "assistant", "content": "8"},
    ]
    text = format_chat(msgs, tok, "llama2")
    assert text == "<s>[INST] Add 2 and 3. [/INST] 5 </s><s>[INST] Add 4 and 4. [/INST] 8 </s>"
    ids, labels = encode_messages(msgs, tok, 2048, "llama2")
    assert tok.decode(ids) == text
    assert trained_runs(tok, ids, labels) == [" 5 </s>", " 8 </s>"]


def test_unknown_chat_format(tok):
    with pytest.raises(InputError, match="unknown chat format 'chatml'"):
        encode_messages(CONVERSATION, tok, 64, "chatml")


# --------------------------------------------------------------------------- reading and validation


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
        ('{"id": 7}', "expected 'messages' or 'prompt' and 'completion'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0] has unknown role 'bot'"),
        ('{"messages": [{"role": "user"}]}', "messages[0] needs 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
        ('{"prompt": "a", "completion": 1}', "'prompt' and 'completion' must be strings"),
        ('[1, 2]', "expected a JSON object per line"),
    ],
)
def test_read_jsonl_names_file_and_line(tmp_path, bad, message):
    good = json.dumps({"prompt": "a", "completion": "b"})
    f = tmp_path / "x.jsonl"
    f.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n")  # the bad one is physical line 4 (blank lines count)
    with pytest.raises(InputError) as exc:
        read_jsonl(f)
    assert str(exc.value).startswith(f"{f}:4: ")
    assert message in str(exc.value)


def test_read_jsonl_keeps_raw_lines_and_extra_keys(tmp_path):
    lines = [
        json.dumps(
            {
                "dataset": "d",
                "id": "a",
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            }
        ),
        json.dumps({"prompt": "p", "completion": "c", "extra": [1, 2]}),
    ]
    f = tmp_path / "x.jsonl"
    f.write_text(lines[0] + "\n\n" + lines[1] + "\n")
    recs = read_jsonl(f)
    assert [(r.line, r.raw) for r in recs] == [(0, lines[0]), (2, lines[1])]
    assert recs[0].data["dataset"] == "d" and recs[1].data["extra"] == [1, 2]


def test_read_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------- the warmup subset


def reference_subset(n: int, p: float, seed: int) -> np.ndarray:
    np.random.seed(seed)
    return np.random.permutation(n)[: int(n * p)]


@pytest.mark.parametrize("n", [1, 7, 100, 270679])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
@pytest.mark.parametrize("seed", [0, 3, 42])
def test_subset_matches_less(n, p, seed):
    got = subset_indices(n, p, seed)
    np.testing.assert_array_equal(got, reference_subset(n, p, seed))
    assert len(got) == int(n * p)


@pytest.mark.parametrize("n", [0, 1, 9, 360])
def test_subset_full_keeps_file_order(n):
    np.testing.assert_array_equal(subset_indices(n, 1.0, 3), np.arange(n))


def test_subset_restores_global_rng():
    np.random.seed(1234)
    before = np.random.get_state()
    expected_next = np.random.random_sample(5)
    np.random.set_state(before)
    subset_indices(1000, 0.05, 3)
    after = np.random.get_state()
    assert after[0] == before[0] and after[2:] == before[2:]
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(np.random.random_sample(5), expected_next)


def test_training_set_is_the_seeded_subset_of_the_pooled_files(tok, tiny_data):
    files = tiny_data["train"]
    flat = Pool.read(files).flat()
    assert [name for name, _ in flat] == ["synth_a"] * 180 + ["synth_b"] * 180  # config order, concatenated
    out, counts = build_training_set(files, tok, 128, "tulu", 0.05, 3)
    idx = reference_subset(len(flat), 0.05, 3)
    assert counts == {"pool": 360, "subset": 18, "dropped_no_labels": 0}
    assert [(e.source, e.line) for e in out] == [(flat[i][0], flat[i][1].line) for i in idx]


def test_examples_without_an_answer_are_not_blamed_on_truncation(tok, tmp_path, caplog):
    asked = {"messages": [{"role": "user", "content": "Add 2 and 3."}]}  # no assistant turn: nothing to learn
    short = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in (asked, short)) + "\n")
    out, counts = build_training_set({"pool": f}, tok, 24, "tulu", 1.0, 3)
    assert counts["dropped_no_labels"] == 1 and [e.line for e in out] == [1]
    from lessctl.errors import LogFormatter

    lines = [LogFormatter().format(r) for r in caplog.records if "no trainable tokens" in r.getMessage()]
    assert lines == [
        "warning: 1 of 2 examples have no trainable tokens (no assistant answer to learn, before any cut) and were "
        "skipped"
    ]
