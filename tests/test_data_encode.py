"""Loss masks with the real SmolLM2 tokenizer and its ChatML template, and with templates of other shapes."""

from __future__ import annotations

import copy
import logging

import pytest

from loraforge.data import IGNORE_INDEX, Record, encode_record, encode_records, prompt_and_reference
from loraforge.errors import LoraForgeError
from loraforge.model import load_tokenizer, resolve_source


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_source(None).folder)


def chat(*turns: tuple[str, str]) -> Record:
    return Record("chat", "t.jsonl:1", messages=tuple(turns))


CHATS = [
    chat(("user", "Hi"), ("assistant", "Hello there!")),
    chat(("system", "Answer in French."), ("user", "Thanks"), ("assistant", "De rien.\n\nAu revoir"),
         ("user", "Bye"), ("assistant", " Salut ")),
    # an empty turn, a leading newline (merges with the header's newline when tokenized whole), a tag
    chat(("user", "List two."), ("assistant", "- one\n- two"), ("user", "More?"), ("assistant", ""),
         ("user", "ok"), ("assistant", "\n\n<done>")),
]

# Other template shapes, built only from tokens this vocabulary has. Mistral-like moves the system prompt
# into the last user turn, so earlier turns are not prefixes of the whole conversation: the fallback path.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] | trim }}<|endoftext|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)
MISTRAL_LIKE = (
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}[INST] {% if sys and m is sameas users[-1] %}{{ sys }}\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
)


def trained_text(tok, ex) -> str:
    return tok.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX])


@pytest.fixture(scope="module")
def templated(tok):
    made = {}

    def get(template):
        if template not in made:  # a deep copy costs about half a second
            made[template] = copy.deepcopy(tok)
            made[template].chat_template = template
        return made[template]

    return get


@pytest.mark.parametrize("i", range(len(CHATS)))
def test_chatml_trains_exactly_assistant_contents_and_end_of_turn(tok, i):
    rec = CHATS[i]
    ex = encode_record(rec, tok)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(rec.chat(), tokenize=False)
    want = "".join(c + "<|im_end|>" for r, c in rec.messages if r == "assistant")
    assert trained_text(tok, ex) == want
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ex.input_ids, ex.labels, strict=True))
    # each assistant turn's first trained token comes right after what the model is prompted with
    n_prompt = len(tok(tok.apply_chat_template(prompt_and_reference(rec)[0], tokenize=False,
                                               add_generation_prompt=True), add_special_tokens=False).input_ids)
    assert ex.labels[n_prompt - 1] == IGNORE_INDEX and ex.labels[n_prompt] != IGNORE_INDEX


@pytest.mark.parametrize("template", [LLAMA3_LIKE, MISTRAL_LIKE], ids=["llama3-like", "mistral-like"])
@pytest.mark.parametrize("i", range(len(CHATS)))
def test_other_templates(templated, template, i):
    t = templated(template)
    rec = CHATS[i]
    ex = encode_record(rec, t)
    strip = template is LLAMA3_LIKE  # that template trims contents
    want = "".join((c.strip() if strip else c) + "<|endoftext|>" for r, c in rec.messages if r == "assistant")
    assert trained_text(t, ex) == want
    rendered = t.decode(ex.input_ids)
    if template is MISTRAL_LIKE and rec.messages[0][0] == "system":
        assert "[INST] Answer in French.\n\nBye [/INST]" in rendered  # the shape that defeats prefix rendering


def test_alpaca_goes_through_the_template(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "Add.", "input": "2, 2", "output": "4"}\n')
    from loraforge.data import read_records

    ex = encode_record(read_records(path)[0], tok)
    assert "<|im_start|>user\nAdd.\n\n2, 2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>" in tok.decode(ex.input_ids)
    assert trained_text(tok, ex) == "4<|im_end|>"


def test_completion_is_raw_prompt_then_completion_then_eos(tok):
    rec = Record("completion", "c.jsonl:1", prompt="Q: capital of France?\nA:", completion=" Paris")
    ex = encode_record(rec, tok)
    assert tok.decode(ex.input_ids) == rec.prompt + rec.completion + tok.eos_token
    assert trained_text(tok, ex) == " Paris" + tok.eos_token
    assert ex.input_ids[-1] == tok.eos_token_id


def test_text_trains_everything_plus_eos(tok):
    rec = Record("text", "t.jsonl:1", text="Some plain text.\nTwo lines.")
    ex = encode_record(rec, tok)
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == rec.text + tok.eos_token


@pytest.mark.parametrize("rec", CHATS[:2] + [Record("completion", "c:1", prompt="p q r", completion=" s")])
def test_train_on_prompt_trains_every_token(tok, rec):
    masked, full = encode_record(rec, tok), encode_record(rec, tok, train_on_prompt=True)
    assert full.input_ids == masked.input_ids
    assert full.labels == full.input_ids
    assert any(y == IGNORE_INDEX for y in masked.labels)


def test_truncation_warns_once_with_the_count(tok, caplog):
    records = [Record("completion", f"c:{i}", prompt="Say:", completion=" word" * n) for i, n in enumerate([2, 30, 5, 60, 9])]
    lengths = [len(encode_record(r, tok).input_ids) for r in records]
    max_len = sorted(lengths)[2]
    n_long = sum(n > max_len for n in lengths)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        examples = encode_records(records, tok, max_len)
    assert len(examples) == len(records)
    assert [len(e.input_ids) for e in examples] == [min(n, max_len) for n in lengths]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [f"{n_long} of {len(records)} records were longer than max_len={max_len} tokens and were truncated"]
    full = encode_record(records[3], tok)
    assert examples[3].input_ids == full.input_ids[:max_len] and examples[3].labels == full.labels[:max_len]


def test_records_with_nothing_left_to_train_are_dropped(tok, caplog):
    long_prompt = Record("completion", "c:1", prompt="word " * 50, completion="end")
    short = Record("completion", "c:2", prompt="a", completion=" b")
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        examples = encode_records([long_prompt, short], tok, max_len=10)
    assert examples == [encode_record(short, tok)]
    assert any("1 of 2 records had no trained tokens within max_len=10 and were dropped" in r.getMessage()
               for r in caplog.records)


def test_template_errors_name_the_record(templated):
    picky = templated("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
                               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(LoraForgeError, match=r"^t\.jsonl:1: the chat template rejected this conversation .*must start with user"):
        encode_record(chat(("assistant", "x"), ("user", "y"), ("assistant", "z")), picky)
    none = templated(None)
    with pytest.raises(LoraForgeError, match=r"^t\.jsonl:1: chat and alpaca records need a chat template"):
        encode_record(CHATS[0], none)


def test_max_len_must_allow_a_prediction(tok):
    with pytest.raises(LoraForgeError, match="max_len 1"):
        encode_records(CHATS, tok, 1)
