"""The small trained model that the demo and the tests promote.

A Llama-architecture causal LM (hidden 256, intermediate 512: divisible by every quantization group size we
use) with a byte-level BPE tokenizer trained here and a chat template, trained briefly and deterministically
on a synthetic task the repository generates: a table of made-up facts ("the color of zorvik is teal") to
recall. Evaluation then means something: the trained model answers the questions, a damaged copy does not.

Builds are cached under ``<cache>/tinymodel/<BUILDER_VERSION>/`` (``MODELCTL_CACHE``, default
``~/.cache/modelctl``), so only the first build on a machine trains.

Example:
    >>> result = build("/tmp/tiny")  # doctest: +SKIP
    >>> result.scores["multiple_choice"] >= 0.9  # doctest: +SKIP
    True
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import cache_home
from pipeline.errors import TerminalError
from pipeline.progress import Progress

# Bump when anything that changes the built model changes: data, tokenizer, architecture, training.
BUILDER_VERSION = "tiny-llama-1"
SEED = 1234
MARKER = "tinymodel.json"

SYLLABLES = ["zor", "vik", "tal", "mu", "ren", "qua", "bel", "dor", "sin", "pax", "lom", "tre", "kel", "fen"]
ATTRIBUTES: dict[str, list[str]] = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "city": ["kelm", "arnot", "bressa", "dunmoor", "elvar", "frost", "gallin", "halden"],
    "pet": ["cat", "dog", "owl", "fox", "frog", "horse", "goat", "crab"],
}
N_ENTITIES = 40
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ARCH: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TRAIN: dict[str, Any] = {"steps": 600, "batch_size": 64, "lr": 3e-3, "warmup": 20, "weight_decay": 0.0}


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    @property
    def question(self) -> str:
        return f"What is the {self.attribute} of {self.entity}?"

    @property
    def prompt(self) -> str:
        """The plain-text question prompt; the answer follows after one space."""
        return f"Q: {self.question}\nA:"


@dataclass
class BuildResult:
    """What `build` produced: where the model is, whether the cache served it, and how well it scores."""

    path: Path
    cached: bool
    seconds: float
    builder_version: str = BUILDER_VERSION
    scores: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None


def facts(seed: int = SEED) -> list[Fact]:
    """The deterministic table of made-up facts the model learns."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < N_ENTITIES:
        names.add("".join(rng.sample(SYLLABLES, 2)))
    table = []
    for entity in sorted(names):
        for attribute, values in ATTRIBUTES.items():
            table.append(Fact(entity, attribute, rng.choice(values)))
    return table


def training_texts(table: list[Fact]) -> list[tuple[str, str]]:
    """Each fact as a statement, a Q/A pair and a chat exchange, split as (context, answer).

    The loss is taken on the answer only: the entity names are arbitrary, so predicting them is noise.
    """
    texts = []
    for f in table:
        texts.append((f"The {f.attribute} of {f.entity} is", f" {f.value}.</s>"))
        texts.append((f.prompt, f" {f.value}</s>"))
        texts.append((f"<|user|>\n{f.question}</s>\n<|assistant|>\n", f"{f.value}</s>"))
    return texts


def eval_items(table: list[Fact] | None = None) -> list[dict[str, Any]]:
    """The eval task's items: one question per fact, with every value of that attribute as a choice."""
    items = []
    for f in table or facts():
        choices = ATTRIBUTES[f.attribute]
        items.append(
            {
                "question": f.question,
                "prompt": f.prompt,
                "choices": choices,
                "gold": choices.index(f.value),
                "answer": f.value,
            }
        )
    return items


def default_cache_dir() -> Path:
    return cache_home()


def _train_tokenizer(texts: list[tuple[str, str]], out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ARCH["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special tokens are kept out of the merge statistics; strip them from the training text.
    plain = [t for pair in texts for text in pair for t in _split_special(text)]
    tok.train_from_iterator(plain, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _split_special(text: str) -> list[str]:
    parts = [text]
    for special in SPECIAL_TOKENS:
        parts = [piece for part in parts for piece in part.split(special)]
    return [p for p in parts if p]


def _encode(tokenizer: Any, texts: list[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, labels), padded to the longest example; labels cover the answer only.

    Every other example starts with <s>, so callers that add a BOS token and callers that do not both work.
    """
    import torch

    rows, starts = [], []
    for i, (context, answer) in enumerate(texts):
        ctx = ([tokenizer.bos_token_id] if i % 2 == 0 else []) + tokenizer(context, add_special_tokens=False)[
            "input_ids"
        ]
        rows.append(ctx + tokenizer(answer, add_special_tokens=False)["input_ids"])
        starts.append(len(ctx))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, starts[i] : len(row)] = input_ids[i, starts[i] : len(row)]
    return input_ids, mask, labels


def _train(out: Path, progress: Progress | None) -> float:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    table = facts()
    texts = training_texts(table)
    tokenizer = _train_tokenizer(texts, out)
    input_ids, mask, labels = _encode(tokenizer, texts)

    config = LlamaConfig(
        **ARCH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    steps, batch = int(TRAIN["steps"]), int(TRAIN["batch_size"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / TRAIN["warmup"]) * max(0.05, 1 - s / steps)
    )
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=generator)
        loss = model(input_ids=input_ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        optim.zero_grad(set_to_none=True)
        if progress and (step % 10 == 0 or step == steps - 1):
            progress(f"training (loss {loss.item():.3f})", (step + 1) / steps)
    train_seconds = time.perf_counter() - started
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(out, safe_serialization=True)
    return train_seconds


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a directory with transformers, on the CPU, in eval mode.

    Raises:
        TerminalError: the directory holds no model.
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise TerminalError(
            f"{model_dir} is not a model directory (no config.json)",
            hint="pass a directory written by `modelctl tinymodel build`",
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer


def score(model_dir: str | Path, items: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Score a model on the fact-recall task: multiple-choice accuracy and greedy exact match.

    Multiple choice compares the log-likelihood of each choice after the prompt (as lm-eval does);
    generation decodes greedily and compares the first word with the answer.
    """
    model, tokenizer = load(model_dir)
    import torch

    items = items or eval_items()
    correct_mc = 0
    with torch.no_grad():
        for item in items:
            context = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
            rows = [context + tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item["choices"]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            totals = []
            for i, r in enumerate(rows):
                positions = range(len(context), len(r))
                totals.append(sum(logprobs[i, p - 1, r[p]].item() for p in positions))
            correct_mc += int(max(range(len(totals)), key=totals.__getitem__) == item["gold"])
        tokenizer.padding_side = "left"
        prompts = [item["prompt"] for item in items]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct_gen = sum(
        int(text.strip().split("\n")[0].strip(" .") == item["answer"]) for text, item in zip(texts, items, strict=True)
    )
    return {"multiple_choice": correct_mc / len(items), "generation": correct_gen / len(items), "n": len(items)}


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _weights_sha256(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _build_into_cache(cached: Path, progress: Progress | None) -> dict[str, Any]:
    """Train into a temporary directory beside the cache entry, score it, then rename it into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cached.parent))
    try:
        train_seconds = _train(tmp, progress)
        if progress:
            progress("scoring on the eval task", 1.0)
        scores = score(tmp)
        marker = {
            "builder_version": BUILDER_VERSION,
            "seed": SEED,
            "architecture": ARCH,
            "training": TRAIN,
            "train_seconds": round(train_seconds, 2),
            "scores": scores,
            "weights_sha256": _weights_sha256(tmp),
            "facts": [asdict(f) for f in facts()],
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, cached)
        return marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(
    dest: str | Path | None = None, *, cache_dir: str | Path | None = None, progress: Progress | None = None
) -> BuildResult:
    """Build the small model (or take it from the cache) and, if ``dest`` is given, copy it there.

    Raises:
        TerminalError: ``dest`` exists, is not empty, and holds something other than this model.
    """
    started = time.perf_counter()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = root / "tinymodel" / BUILDER_VERSION
    target = Path(dest) if dest else cached
    if dest and target.exists() and any(target.iterdir()):
        existing = _read_marker(target)
        if not existing or existing.get("builder_version") != BUILDER_VERSION:
            raise TerminalError(
                f"{target} is not empty and does not hold tinymodel {BUILDER_VERSION}",
                hint="choose a new or empty directory",
            )
    with _locked(root / "tinymodel" / ".lock"):
        marker = _read_marker(cached)
        was_cached = marker is not None and marker.get("builder_version") == BUILDER_VERSION
        if not was_cached:
            marker = _build_into_cache(cached, progress)
    assert marker is not None
    if dest and _read_marker(target) != marker:
        tmp = Path(tempfile.mkdtemp(prefix=".tinymodel-", dir=target.parent if target.parent.exists() else None))
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return BuildResult(
        path=target,
        cached=was_cached,
        seconds=time.perf_counter() - started,
        scores=dict(marker["scores"]),
        train_seconds=marker.get("train_seconds"),
    )


NOISE_STRENGTH = 4.0
# The sandbox demo's candidates (measured in benchmarks/sandbox_models.py): v1 is a mildly damaged copy that
# passes the smoke suite's floors (0.8) with no baseline (noise x1.5 scores 0.97 / 0.97 where the clean model
# scores 1.0 / 1.0; x2 is at the floor, 0.83 / 0.80), v2 the clean model (better than v1), v3 `deepen` of v2 to
# 12 layers and MLP width 1024 (the same answers; about 8x v2's TTFT when idle, 3 GB RSS like v2 in vLLM): the
# canary's latency check must catch it.
V1_STRENGTH = 1.5
SLOW_LAYERS = 12
SLOW_INTERMEDIATE = 1024


def damage(src: str | Path, dest: str | Path, strength: float = NOISE_STRENGTH) -> Path:
    """Write a damaged copy of a model: Gaussian noise, ``strength`` times each weight matrix's spread.

    The copy keeps the tokenizer and config, so it looks like a normal candidate; only its weights are
    worse. It is the "bad candidate" that the gates must refuse. Noise, not rounding: this model shrugs off
    rounding (even 1-bit round-to-nearest in groups of 128 keeps 0.97 on its task), while noise at 4x the
    weights' spread takes it to chance.

    Raises:
        TerminalError: ``src`` holds no safetensors weights.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    if not (src / "model.safetensors").is_file():
        raise TerminalError(
            f"{src} has no model.safetensors", hint="pass a directory built by `modelctl tinymodel build`"
        )
    generator = torch.Generator().manual_seed(SEED + 1)
    tensors = load_file(src / "model.safetensors")
    for name, weight in tensors.items():
        if weight.ndim == 2 and "embed" not in name:
            noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
            tensors[name] = weight + noise * weight.std() * strength
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in ("model.safetensors", MARKER):
            shutil.copy2(item, dest / item.name)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "DAMAGED").write_text(f"weights damaged on purpose: gaussian noise x{strength} of each matrix's std\n")
    return dest


def deepen(src: str | Path, dest: str | Path, layers: int, intermediate: int | None = None) -> Path:
    """A deeper (optionally wider) copy of the model in ``src`` with the same outputs: the slow candidate.

    See :mod:`pipeline.tinymodel_deepen`. Raises TerminalError when it cannot be made (nothing is written then).
    """
    from pipeline.tinymodel_deepen import deepen as run

    return run(src, dest, layers, intermediate)
