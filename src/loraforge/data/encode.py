"""Records to token ids and labels: which tokens the loss covers.

Chat records are rendered by the tokenizer's own chat template; the loss mask comes from character
spans of that rendering, and the text is tokenized in pieces cut at the span edges. We find each
assistant turn's span by rendering the conversation up to it: the text of `messages[:i]` with the
generation prompt ends where assistant turn i's content begins, and the text of `messages[:i+1]` ends
after its end-of-turn marker (trailing whitespace aside, which belongs to no turn). Nothing here knows
ChatML or any other template's strings.

A few templates render early turns differently once later turns follow (Mistral's moves the system
prompt into the last user turn), so those prefixes are not prefixes of the whole. For them we fall back
to finding each message's content in the rendering in order, and take the special token that follows
an assistant's content as its end-of-turn marker.

Labels are not shifted: labels[t] is input_ids[t] where token t is trained, else -100, and the model
learns to predict labels[t + 1] from position t.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise

from ..errors import LoraForgeError
from .records import Record

log = logging.getLogger("loraforge")

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; -100 where the loss does not apply
    positions: list[int] | None = None  # packed rows only: restarts at 0 for each example in the row
    doc_lens: list[int] | None = None  # packed rows only: the lengths of the examples in the row, in order


def encode_records(records: list[Record], tokenizer, max_len: int, train_on_prompt: bool = False) -> list[Example]:
    """Tokenize records, keeping the first `max_len` tokens of each.

    One warning counts the records truncated. Records left with no trained token (a prompt that fills
    all of max_len) are dropped, with a warning, since they would cost compute and teach nothing.
    """
    if max_len < 2:
        raise LoraForgeError(f"max_len {max_len}: must be at least 2 tokens")
    out, truncated, empty = [], 0, 0
    max_chars = 2 * max_len * longest_token_chars(tokenizer)
    for rec in records:
        ex = encode_record(rec, tokenizer, train_on_prompt, max_chars=max_chars)
        if len(ex.input_ids) > max_len:
            truncated += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
        # labels[0] is never predicted (nothing precedes it), so it does not count as trained
        if all(y == IGNORE_INDEX for y in ex.labels[1:]):
            empty += 1
            continue
        out.append(ex)
    if truncated:
        log.warning("%d of %d records were longer than max_len=%d tokens and were truncated", truncated,
                    len(records), max_len)
    if empty:
        log.warning("%d of %d records had no trained tokens within max_len=%d and were dropped", empty,
                    len(records), max_len)
    return out


def longest_token_chars(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` covers (its longest vocabulary entry: byte-level
    and SentencePiece vocabularies spell each byte or space as one character of the entry)."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def encode_record(record: Record, tokenizer, train_on_prompt: bool = False, max_chars: int | None = None) -> Example:
    """One record, untruncated; or, with `max_chars`, its text cut to that many characters before
    tokenizing, so a huge record costs what its first tokens cost.

    encode_records passes 2 * max_len * longest_token_chars: that text has at least 2 * max_len tokens, and
    its first max_len tokens are those of the whole text unless one word spans the cut from the first half.
    """
    if record.kind == "chat":
        if train_on_prompt:  # every token is trained: no spans to find
            text, spans = render(tokenizer, record.chat(), record.where, False), []
        else:
            text, spans = chat_spans(record, tokenizer)
        text, spans, _ = _clip(text, spans, max_chars)
        ids, trained = _tokenize(tokenizer, text, spans, add_special_tokens=False)  # the template adds them
    else:
        if record.kind == "completion":
            text = record.prompt + record.completion
            spans = [(len(record.prompt), len(text))]
        else:
            text = record.text
            spans = [(0, len(text))]
        text, spans, clipped = _clip(text, spans, max_chars)
        ids, trained = _tokenize(tokenizer, text, spans, add_special_tokens=True)  # a BOS, if the model uses one
        if tokenizer.eos_token_id is None:
            raise LoraForgeError(f"{record.where}: the tokenizer has no EOS token to end a {record.kind} record with")
        if ids[-1:] != [tokenizer.eos_token_id] and not clipped:  # a cut text does not end here
            ids.append(tokenizer.eos_token_id)
            trained.append(True)  # learning to stop is part of the completion
    labels = [t if (train_on_prompt or keep) else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return Example(ids, labels)


def _clip(text: str, spans: list[tuple[int, int]], max_chars: int | None) -> tuple[str, list[tuple[int, int]], bool]:
    if max_chars is None or len(text) <= max_chars:
        return text, spans, False
    return text[:max_chars], [(a, min(b, max_chars)) for a, b in spans if a < max_chars], True


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and whether each is trained (inside a span).

    The text is tokenized piece by piece, cut at span edges, so no token straddles a header and its
    content (a header's newline merging with a content's leading newline): every trained token is
    content, and the prompt side tokenizes exactly as the prompt alone does at inference.
    """
    cuts = sorted({0, len(text), *(x for span in spans for x in span)})
    ids: list[int] = []
    trained: list[bool] = []
    for a, b in pairwise(cuts):
        if a == 0:
            piece = tokenizer(text[:b], add_special_tokens=add_special_tokens)["input_ids"]
        else:
            piece = _continuation(tokenizer, text[a:b])
        ids += piece
        trained += [any(sa <= a and b <= sb for sa, sb in spans)] * len(piece)
    return ids, trained


def _continuation(tokenizer, piece: str) -> list[int]:
    """Ids of `piece` as it tokenizes in mid-text.

    Tokenized alone, SentencePiece tokenizers would prepend a word-start space to it; so we tokenize it
    after a special token (which no merge crosses) and drop that. Unless the special token swallows the
    whitespace after it (rstrip), which its offsets show: then alone it is.
    """
    anchor = tokenizer.eos_token
    if anchor:
        enc = tokenizer(anchor + piece, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"][:1] == [tokenizer.eos_token_id] and tuple(enc["offset_mapping"][0]) == (0, len(anchor)):
            return list(enc["input_ids"][1:])
    return list(tokenizer(piece, add_special_tokens=False)["input_ids"])


def render(tokenizer, messages: list[dict[str, str]], where: str, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LoraForgeError(f"{where}: chat and alpaca records need a chat template, and this tokenizer has none")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 -- templates raise their own errors (e.g. roles must alternate)
        raise LoraForgeError(f"{where}: the chat template rejected this conversation ({type(e).__name__}: {e})") from None


def chat_spans(record: Record, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn)."""
    msgs = record.chat()
    full = render(tokenizer, msgs, record.where, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, msgs[:i], record.where, True) if i else None
        turn = render(tokenizer, msgs[: i + 1], record.where, False)
        if head is None or not (full.startswith(turn) and turn.startswith(head)):
            return full, _search_spans(full, msgs, tokenizer, record.where)
        a = len(head)
        spans.append((a, max(a, len(turn.rstrip()))))
    return full, spans


def _search_spans(full: str, msgs: list[dict[str, str]], tokenizer, where: str) -> list[tuple[int, int]]:
    # Find user and assistant contents in order (system prompts may be moved, so they are not looked for).
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    spans, cursor = [], 0
    for j, m in enumerate(msgs):
        if m["role"] == "system":
            continue
        content = m["content"]
        a = full.find(content, cursor)
        if a < 0:  # templates often trim
            content = content.strip()
            a = full.find(content, cursor)
        if a < 0:
            raise LoraForgeError(
                f"{where}: cannot find messages[{j}] in the chat template's rendering, so the loss mask is "
                "unknown; use train_on_prompt or a template that renders each turn as its own prefix"
            )
        b = cursor = a + len(content)
        if m["role"] == "assistant":
            gap = len(full[b:]) - len(full[b:].lstrip())
            end = next((s for s in specials if s and full.startswith(s, b + gap)), None)
            if end is not None:
                b = cursor = b + gap + len(end)
            spans.append((a, b))
    return spans
