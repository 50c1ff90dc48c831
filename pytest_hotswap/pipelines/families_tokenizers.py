"""Offline tokenizers for the tiny pipeline families: no hub, no download, no training.

Each is the transformers tokenizer class a diffusers pipeline expects (``CLIPTokenizer``,
``T5Tokenizer``, ``Qwen2Tokenizer``), built from a vocabulary made here: every character is a
token and there are no merges, so any prompt tokenizes, and ``save_pretrained`` writes files the
same class reads back (``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``).
Vocabularies stay under 1000 ids, the vocabulary size of the tiny text encoders.
"""

from __future__ import annotations

import string
from typing import Any

#: The characters of the T5 unigram vocabulary (printable ASCII but whitespace, which T5 maps to ▁).
_ASCII = [c for c in string.printable if not c.isspace()]

#: Qwen's chat markers: special tokens, so a template's markers are one id each.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: A Qwen-style chat template (Z-Image formats its prompt with ``apply_chat_template``).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_characters() -> list[str]:
    """The 256 characters GPT-2 style byte-level BPE uses for the 256 byte values."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer``: byte-level characters, each also with CLIP's end-of-word ``</w>``.

    ``<|endoftext|>`` is the highest id, as in CLIP's own vocabulary: a text encoder whose config
    says ``eos_token_id=2`` pools the token with the highest id (transformers' legacy rule).
    """
    from transformers import CLIPTokenizer

    characters = _byte_characters()
    pieces = characters + [c + "</w>" for c in characters]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5Tokenizer`` (unigram): ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ASCII pieces."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _ASCII]
    vocab += [("\u2581" + c, -2.5) for c in _ASCII]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def qwen_tokenizer(model_max_length: int = 1024) -> Any:
    """A ``Qwen2Tokenizer`` (byte-level BPE) with Qwen's chat markers and a chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_characters())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


#: Tokenizer builders by the name a family's table entry uses.
TOKENIZERS = {"clip": clip_tokenizer, "t5": t5_tokenizer, "qwen": qwen_tokenizer}
