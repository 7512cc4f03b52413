"""A character-level tokenizer for the synthetic arithmetic task, saved and loaded in Hugging Face format.

Built with the `tokenizers` library and wrapped as `PreTrainedTokenizerFast`, so `save_pretrained` writes
`tokenizer.json` + `tokenizer_config.json` that transformers and vLLM read like any other tokenizer.
The vocabulary is padded with reserved tokens to exactly the model's `vocab_size`, so every id the model can
sample decodes, and `len(tokenizer) == model.vocab_size`.
"""

from __future__ import annotations

from pathlib import Path

# ids are stable: specials first, then characters; new characters must be appended, never inserted
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*= QA:") + ["\n"]
VOCAB_SIZE = 32
MIN_VOCAB_SIZE = len(SPECIALS) + len(CHARS)


def build_char_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A `PreTrainedTokenizerFast` with one token per character and exactly `vocab_size` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"model.vocab_size={vocab_size}: the arithmetic tokenizer needs at least {MIN_VOCAB_SIZE} ids")
    tokens = SPECIALS + CHARS
    reserved = [f"<reserved_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens + reserved)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character is its own piece ("(?s)." so that a newline is one too)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", additional_special_tokens=reserved)
    fast.model_max_length = 1 << 20
    return fast


def load_tokenizer(path):
    """Any Hugging Face tokenizer directory (ours or a model's), read locally only."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
