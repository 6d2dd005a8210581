"""Tokenizers: an HF tokenizer folder, or `bytes`, a byte-level one that needs no download.

`bytes` maps every UTF-8 byte to its own token (ids 4-259 after <pad>, <s>, </s>, <unk>), so it
covers any text; the tiny recipe uses it with a 512-token LLM. `word_tokenizer` builds a
word-level one from a corpus (the demo's synthetic set): a word is one token, as in a real
LLM's vocabulary, so an answer is one token and the audio prefix is most of the sequence.
"""

from __future__ import annotations

BYTES = "bytes"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def word_tokenizer(texts):
    """A word-level tokenizer (words and punctuation) over `texts`, with the same special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def load_tokenizer(spec: str):
    if spec == BYTES:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)
