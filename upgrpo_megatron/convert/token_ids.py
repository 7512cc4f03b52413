"""The bos / eos / pad ids an exported config.json and generation_config.json carry.

The trainer's export hands over its live transformers tokenizer (ids are attributes). The standalone export
(tools/convert_megatron_to_hf.py) has only the tokenizer files saved with the checkpoint (`TokenizerFiles`);
without ids from them its generation_config.json had no eos_token_id and `transformers` `generate` ran to
max_new_tokens. Both kinds go through `special_token_ids`, so both exports write the same ids.

From files, the ids are resolved the way transformers resolves them, without importing it (seconds of import
for three integers): the special tokens' text from tokenizer_config.json (or special_tokens_map.json), its id
from the added tokens (tokenizer_config.json `added_tokens_decoder`, tokenizer.json `added_tokens`,
added_tokens.json) or the vocabulary (tokenizer.json `model.vocab`, vocab.json). A token the files do not
resolve (e.g. a sentencepiece-only tokenizer.model) gets no id, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from upgrpo_megatron.convert.errors import ConversionError

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(tokenizer) -> Dict[str, int]:
    """{bos,eos,pad}_token_id of a transformers tokenizer or of `TokenizerFiles`; absent ids are left out."""
    if tokenizer is None:
        return {}
    files = getattr(tokenizer, "files", None)
    if files is not None and not hasattr(tokenizer, "eos_token_id"):  # TokenizerFiles: files on disk
        return _ids_from_files({Path(f).name: Path(f) for f in files})
    return {k: int(getattr(tokenizer, k)) for k in TOKEN_ID_KEYS if getattr(tokenizer, k, None) is not None}


def _read_json(path: Optional[Path]):
    if path is None:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the tokenizer's special tokens ({type(e).__name__}: {e})") from None


def _token_text(tok) -> Optional[str]:
    """A special token as saved: a string, or a serialised AddedToken {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok if isinstance(tok, str) else None


def _token_to_id(by_name: Dict[str, Path], config: dict) -> Dict[str, int]:
    """Text -> id over every place a tokenizer's files keep ids; later sources win, as added tokens do."""
    ids: Dict[str, int] = {}
    tj = _read_json(by_name.get("tokenizer.json"))
    vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj, dict) else None
    if isinstance(vocab, dict):  # BPE / WordLevel / WordPiece
        ids.update({k: int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
        ids.update({p[0]: i for i, p in enumerate(vocab) if isinstance(p, list) and p})
    ids.update(_read_json(by_name.get("vocab.json")))
    ids.update(_read_json(by_name.get("added_tokens.json")))
    ids.update({t["content"]: int(t["id"]) for t in (tj.get("added_tokens") or []) if "content" in t and "id" in t})
    ids.update({_token_text(t): int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()
                if _token_text(t) is not None})
    return ids


def _ids_from_files(by_name: Dict[str, Path]) -> Dict[str, int]:
    config = _read_json(by_name.get("tokenizer_config.json"))
    special = _read_json(by_name.get("special_tokens_map.json"))
    ids = _token_to_id(by_name, config)
    out = {}
    for key in TOKEN_ID_KEYS:
        name = key[: -len("_id")]
        text = _token_text(config.get(name)) or _token_text(special.get(name))
        if text is not None and text in ids:
            out[key] = ids[text]
    return out
