"""A character-level tokenizer for the synthetic arithmetic task, saved and loaded in Hugging Face format.

Built with the `tokenizers` library and wrapped as `PreTrainedTokenizerFast`, so `save_pretrained` writes
`tokenizer.json` + `tokenizer_config.json` that transformers and vLLM read like any other tokenizer.
The vocabulary is padded with reserved tokens to a fixed size so the model's vocabulary equals it exactly
(every id the model can sample decodes).
"""

from __future__ import annotations

from pathlib import Path

CHARS = list("0123456789+-*= QA:")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB_SIZE = 32


def build_char_tokenizer(vocab_size: int = VOCAB_SIZE):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + CHARS
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size={vocab_size}: the character tokenizer needs at least {len(tokens)} ids")
    tokens += [f"<reserved_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", additional_special_tokens=[t for t in tokens if t.startswith("<reserved")])
    fast.model_max_length = 4096
    return fast


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path)))
