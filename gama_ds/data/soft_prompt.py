"""GAMA-IT's soft prompt on the text side: a clip's tags -> the sentence -> token ids.

The paper (reference/gama.md §1.8) adds "According to <hint>, you are allowed to use or partially
use the following tags: [tags]" as input, `<hint>` replaced by trainable embeddings. Here:

- the tags kept are the stored ones (score-descending) with score >= `threshold`, at most `top_k`,
  their labels joined by `separator`, no scores shown; none kept: `no_tags` in their place, or,
  when that is null, no sentence at all;
- the sentence is the prompt template's Input section (before a QA pair's own input, if any, on
  the line after it); a text-only example gets none;
- tokenising, the prompt is cut at the hint: the text before it (with the tokenizer's start
  tokens), `tokens` placeholders, then the text after it (no special tokens), each part tokenised
  on its own, so that no BPE merge can join the soft tokens to their neighbours.

The placeholders are PLACEHOLDER (-1) in the id lists; the collator turns them into a hint mask
(the model puts the soft embeddings there) and pad ids, and they are never supervised.
Settings: `model.soft_prompt` (config.SoftPromptConfig). Plain functions, no model here.
"""

from __future__ import annotations

from ..errors import GamaDsError

HINT = "<hint>"  # in the template: where the soft tokens go
TAGS = "{tags}"  # in the template: where the tag list goes
# Marks the hint in a prompt string until it is cut there: a private-use character that no
# tokenizer merges with anything, since it never reaches one.
SENTINEL = "\ue000"
PLACEHOLDER = -1  # a soft token's place in a tokenised prompt; never a real id


def kept_tags(tags: list, settings) -> list[str]:
    """The labels the sentence lists: score >= threshold, the first `top_k` (stored order:
    score-descending)."""
    return [label for label, score in tags if score >= settings.threshold][: settings.top_k]


def sentence(tags: list, settings) -> str | None:
    """The sentence for one clip's tags, its hint as SENTINEL; None when there is none."""
    labels = kept_tags(tags, settings)
    listed = settings.separator.join(labels) if labels else settings.no_tags
    if listed is None:
        return None
    return settings.template.replace(TAGS, listed).replace(HINT, SENTINEL)


def with_sentence(qa: dict, tags: list | None, has_audio: bool, settings, where: str = "") -> dict:
    """`qa` with the soft prompt's sentence as its input (before its own input, if any)."""
    if settings is None or not has_audio:
        return qa
    if tags is None:
        raise GamaDsError(
            f"{where or 'a clip'}: no tags, and the model has a soft prompt (model.soft_prompt); tag the "
            "shard set with `gama-ds tag SHARDS --tagger DIR`, or give the clip's tags"
        )
    text = sentence(tags, settings)
    if text is None:
        return qa
    own = qa.get("input") or ""
    return {**qa, "input": f"{text}\n{own}" if own else text}


def encode(tokenizer, prompt: str, answer: str, tokens: int, cutoff_len: int) -> list[int]:
    """Token ids of prompt + answer, cut at `cutoff_len`; the hint's SENTINEL (at most one)
    becomes `tokens` PLACEHOLDERs, the parts on either side tokenised on their own."""
    parts = (prompt + answer).split(SENTINEL)
    if len(parts) == 1:  # no sentence: exactly as the reference tokenises
        return tokenizer(prompt + answer, truncation=True, max_length=cutoff_len)["input_ids"]
    if len(parts) != 2:
        raise GamaDsError("a question or answer holds U+E000, which marks the soft prompt's hint")
    before, after = parts
    ids = tokenizer(before)["input_ids"] + [PLACEHOLDER] * tokens
    ids += tokenizer(after, add_special_tokens=False)["input_ids"]
    return ids[:cutoff_len]


def init_ids(tokenizer, settings) -> list[int]:
    """The token ids whose embedding rows start the soft tokens: `init`'s tokens, repeated in
    order until there are `tokens` of them (a shorter text cycles, a longer one is cut)."""
    ids = tokenizer(settings.init, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GamaDsError(f"model.soft_prompt.init {settings.init!r} has no tokens in this tokenizer")
    return [ids[i % len(ids)] for i in range(settings.tokens)]
