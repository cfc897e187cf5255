"""Helpers the tests share (tests/ is on sys.path: conftest puts it there)."""

from __future__ import annotations

from pathlib import Path

import transformers


def word_tokenizer(directory: Path, padding_side: str) -> None:
    """A real (word-level) tokenizer saved beside the model, so text batches come from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.inputs import sentences

    words = sorted({w for s in sentences() for w in s.lower().split()})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words[:990])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                                padding_side=padding_side)  # no pad token: a GPT-style tokenizer
    fast.save_pretrained(directory)


def keys(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
