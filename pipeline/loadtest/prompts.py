"""Prompts for the load test: synthetic ones of an exact token length, or a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import TerminalError
from pipeline.secrets import redact

_WORDS = ("the", "river", "stone", "carries", "light", "over", "quiet", "fields", "where", "old", "maps")


@dataclass(frozen=True)
class PromptSet:
    """Prompt texts to cycle through, and how they were made (for the report)."""

    texts: tuple[str, ...]
    source: str


def synthetic_prompts(tokens: int, tokenizer_dir: Path | None = None, count: int = 64) -> PromptSet:
    """``count`` distinct prompts of exactly ``tokens`` tokens under the model's tokenizer.

    Without a tokenizer, prompts of ``tokens`` words (roughly as many tokens) are made instead, and the report
    says so. Only ``tokenizer.json`` is read (through ``tokenizers``: fast, no model load).

    Raises:
        TerminalError: the tokenizer directory has no readable tokenizer.json.
    """
    rng = random.Random(tokens)
    if tokenizer_dir is None:
        words = [" ".join([f"r{i}", *rng.choices(_WORDS, k=tokens - 1)]) for i in range(count)]
        return PromptSet(tuple(words), f"synthetic, {tokens} words (approximate tokens: no tokenizer given)")
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise TerminalError(
            f"cannot read the tokenizer at {file}: {redact(str(exc))[:200]}",
            hint="pass the model directory (the one holding tokenizer.json) as the tokenizer",
        ) from None
    texts = []
    for i in range(count):
        text = " ".join([f"r{i}", *rng.choices(_WORDS, k=tokens * 2)])
        ids = tok.encode(text, add_special_tokens=False).ids[:tokens]
        texts.append(tok.decode(ids))
    return PromptSet(tuple(texts), f"synthetic, {tokens} tokens ({file.parent.name} tokenizer)")


def file_prompts(path: Path) -> PromptSet:
    """Prompts from a JSONL file: one object per line with a ``prompt`` string (blank lines are skipped).

    Raises:
        TerminalError: the file is unreadable, empty, or a line is not such an object (the line is named).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TerminalError(f"cannot read the prompt file {path}: {exc}", hint="pass a readable JSONL file") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TerminalError(f"{path}:{number}: not JSON ({exc.msg})", hint='write {"prompt": "..."}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise TerminalError(f"{path}:{number}: expected an object with a non-empty 'prompt' string")
        texts.append(item["prompt"])
    if not texts:
        raise TerminalError(f"{path}: no prompts in the file", hint='write one {"prompt": "..."} per line')
    return PromptSet(tuple(texts), f"file {Path(path).name} ({len(texts)} prompts)")
