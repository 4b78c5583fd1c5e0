"""The files that travel with a Hugging Face model folder besides its weights: the tokenizer and the
generation settings. `moeify convert` copies them into its output so the result can be exported for
ONNX Runtime GenAI (or loaded by transformers) without pointing back at the source folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Tokenizer files ONNX Runtime GenAI reads (and transformers' fast/slow tokenizers of LLaMA-like models)."""

COMPANION_FILES = (*TOKENIZER_FILES, "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "generation_config.json")


def companion_files(folder: str | Path) -> list[Path]:
    """The COMPANION_FILES present in `folder` (none when it is not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [folder / name for name in COMPANION_FILES if (folder / name).is_file()]


def copy_files(files: Iterable[Path], dst: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `files` into the folder `dst` under their own names, except the names in `skip` (files the
    writer already made); returns the names copied."""
    skip = set(skip)
    names = []
    for file in files:
        if file.name not in skip:
            shutil.copyfile(file, dst / file.name)
            names.append(file.name)
    return names
