"""`lohan-jax prepare`: text or JSONL into packed token files (.bin, sidecar .json, loss mask for chat data).

Text (a .txt file is one document; a JSONL record's `--field`) becomes one stream, each document ended by eos,
cut into rows of seq_len + 1 tokens. Chat or instruction data (JSONL records with prompt/response fields, or a
list of {"role", "content"} messages) becomes one example per record, packed greedily into rows and padded,
with a parallel loss mask that is 1 on response tokens only, so training learns the answers and not the
prompts. Rows are written as they fill, so memory stays flat whatever the corpus size (except with
--shuffle-seed, which reads all records first).
The sidecar records everything `open_dataset` needs (dtype, vocab_size, seq_len, mask file) and the tokenizer's
sha256, so training with another tokenizer is caught.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lohan_jax.data.sources import stream_dtype
from lohan_jax.data.tokenizer import Tokenizer, load_tokenizer

ROLE_LEARNED = "assistant"  # messages whose content the loss covers


class Format(str, enum.Enum):
    AUTO = "auto"  # chat if the first record has messages or prompt+response fields, else text
    TEXT = "text"
    CHAT = "chat"


@dataclasses.dataclass(frozen=True)
class Fields:
    """JSONL field names."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


# ---- reading ---------------------------------------------------------------------------------------------------
def read_records(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, Any]]:
    """(where, record): a .txt file is one str record; each non-blank line of a .jsonl file is one JSON value."""
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"input {path} does not exist or is not a file")
        if path.suffix == ".txt":
            try:
                yield str(path), path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"text file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        elif path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{path}:{lineno}", json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one JSON "
                                             "object per line (JSONL)") from None
        else:
            raise ValueError(f"input {path} has an unknown extension; expected .txt or .jsonl")


def _field(record: Any, name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise ValueError(f"{where}: no field {name!r} (fields: {', '.join(map(repr, record)) or 'none'}); "
                         "choose the field with --field, --prompt-field/--response-field or --messages-field")
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def detect_format(record: Any, fields: Fields) -> Format:
    if isinstance(record, dict) and (fields.messages in record or {fields.prompt, fields.response} <= set(record)):
        return Format.CHAT
    return Format.TEXT


# ---- examples: token ids and loss mask -------------------------------------------------------------------------
def chat_example(record: Any, tokenizer: Tokenizer, fields: Fields, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, mask uint8) of one chat record. prompt/response: prompt ids (mask 0), then response ids and eos
    (mask 1). messages: per message "<|role|>\\n" (mask 0), its content (mask 1 for the assistant), then eos after
    an assistant turn (mask 1) or "\\n" after any other (mask 0). The tokenizer's own chat template is not used."""
    pieces: list[tuple[np.ndarray, int]] = []
    eos = np.array([tokenizer.eos_id], np.int32)
    if isinstance(record, dict) and fields.messages in record:
        messages = record[fields.messages]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field {fields.messages!r} must be a non-empty list of messages")
        for i, m in enumerate(messages):
            role, content = _field(m, "role", f"{where} message {i}"), _field(m, "content", f"{where} message {i}")
            learned = role == ROLE_LEARNED
            pieces += [(tokenizer.encode(f"<|{role}|>\n"), 0), (tokenizer.encode(content), int(learned)),
                       (eos, 1) if learned else (tokenizer.encode("\n"), 0)]
        if not any(m.get("role") == ROLE_LEARNED for m in messages):
            raise ValueError(f"{where}: no {ROLE_LEARNED!r} message, so nothing to learn from this record")
    else:
        pieces = [(tokenizer.encode(_field(record, fields.prompt, where)), 0),
                  (tokenizer.encode(_field(record, fields.response, where)), 1), (eos, 1)]
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int32)
    mask = np.concatenate([np.full(len(p), m, np.uint8) for p, m in pieces])
    return ids, mask


# ---- packing ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackStats:
    examples: int = 0
    rows: int = 0
    truncated: int = 0  # chat examples cut to one row
    dropped_tokens: int = 0  # text: the tail shorter than a row
    loss_tokens: int = 0  # mask == 1 (text: every token)


def cut_stream(docs: Iterable[np.ndarray], row_tokens: int, stats: PackStats) -> Iterator[np.ndarray]:
    """Documents (each already ended by eos) laid end to end and cut into full rows; the short tail is dropped."""
    carry = np.zeros(0, np.int32)
    for doc in docs:
        stats.examples += 1
        carry = np.concatenate([carry, doc])
        n = len(carry) // row_tokens
        for r in range(n):
            yield carry[r * row_tokens:(r + 1) * row_tokens]
        carry = carry[n * row_tokens:]
    stats.dropped_tokens = len(carry)


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]], row_tokens: int, pad_id: int, stats: PackStats,
                  pack: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Greedy packing: each example goes into the current row when it fits, else the row is padded (mask 0) and
    a new one starts; an example longer than a row is truncated to one. pack=False gives one example per row.
    Examples packed together attend to each other (causal attention, no document mask)."""
    ids_row: list[np.ndarray] = []
    mask_row: list[np.ndarray] = []
    used = 0

    def flush():
        pad = row_tokens - used
        ids = np.concatenate([*ids_row, np.full(pad, pad_id, np.int32)])
        mask = np.concatenate([*mask_row, np.zeros(pad, np.uint8)])
        ids_row.clear()
        mask_row.clear()
        return ids, mask

    for ids, mask in examples:
        stats.examples += 1
        if len(ids) > row_tokens:
            ids, mask = ids[:row_tokens], mask[:row_tokens]
            stats.truncated += 1
        if used and (not pack or used + len(ids) > row_tokens):
            yield flush()
            used = 0
        ids_row.append(ids)
        mask_row.append(mask)
        used += len(ids)
    if used:
        yield flush()


# ---- the command ---------------------------------------------------------------------------------------------
def prepare(inputs: list[str | os.PathLike], out: str | os.PathLike, *, tokenizer: str, seq_len: int,
            fmt: Format | str = Format.AUTO, fields: Fields = Fields(), pack: bool = True,
            model_vocab_size: int | None = None, shuffle_seed: int | None = None) -> dict[str, Any]:
    """Tokenizes `inputs` into `out` (a .bin path; writes out, out.json sidecar and, for chat, a .mask.bin).

    Returns the sidecar dict. Raises ValueError for an empty dataset, a record without the chosen field, or a
    tokenizer whose vocabulary exceeds `model_vocab_size`.
    """
    out = Path(out)
    if out.suffix != ".bin":
        raise ValueError(f"--out {out} must end in .bin (the sidecar goes to {out.name}.json next to it)")
    if seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    tok = load_tokenizer(tokenizer)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise ValueError(f"the tokenizer {tokenizer} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model_vocab_size}: the tokenizer does not match the model; use the model's tokenizer.json")
    records: Iterable[tuple[str, Any]] = read_records(inputs)
    if shuffle_seed is not None:
        records = list(records)
        records = [records[i] for i in np.random.default_rng(shuffle_seed).permutation(len(records))]
    records = iter(records)
    first = next(records, None)
    if first is None:
        raise ValueError(f"empty dataset: {', '.join(map(str, inputs))} hold no documents or records")
    fmt = Format(fmt)
    if fmt is Format.AUTO:
        fmt = detect_format(first[1], fields)
    stream = _chain([first], records)

    row_tokens, stats, dtype = seq_len + 1, PackStats(), stream_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], np.int32)
    tmp_bin, tmp_mask = out.with_name(out.name + ".partial"), out.with_name(out.stem + ".mask.bin.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp_bin, "wb") as f_ids, open(tmp_mask, "wb") as f_mask:
        if fmt is Format.TEXT:
            docs = (np.concatenate([tok.encode(r if isinstance(r, str) else _field(r, fields.text, w)), eos])
                    for w, r in stream)
            for row in cut_stream(docs, row_tokens, stats):
                f_ids.write(row.astype(dtype).tobytes())
                stats.rows += 1
            stats.loss_tokens = stats.rows * row_tokens
        else:
            examples = (chat_example(r, tok, fields, w) for w, r in stream)
            for ids, mask in pack_examples(examples, row_tokens, tok.eos_id, stats, pack):
                f_ids.write(ids.astype(dtype).tobytes())
                f_mask.write(mask.tobytes())
                stats.rows += 1
                stats.loss_tokens += int(mask.sum())
    try:
        if stats.rows == 0:
            raise ValueError(f"empty dataset: {stats.examples} documents gave {stats.dropped_tokens} tokens, fewer "
                             f"than one sequence of seq_len + 1 = {row_tokens}; use more data or a smaller --seq-len")
        if stats.loss_tokens == 0:
            raise ValueError("empty dataset: every token is masked out, so there is nothing to learn")
        mask_path = out.with_name(out.stem + ".mask.bin") if fmt is Format.CHAT else None
        tok_path = getattr(tok, "path", None)
        sidecar = {
            "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "seq_len": seq_len, "rows": stats.rows,
            "tokens": stats.rows * row_tokens, "format": fmt.value, "mask": mask_path.name if mask_path else None,
            "loss_tokens": stats.loss_tokens, "examples": stats.examples, "truncated": stats.truncated,
            "dropped_tokens": stats.dropped_tokens, "eos_id": tok.eos_id, "tokenizer": str(tok_path or tokenizer),
            "tokenizer_sha256": hashlib.sha256(Path(tok_path).read_bytes()).hexdigest() if tok_path else None,
            "inputs": [str(p) for p in inputs], "created_by": "lohan-jax prepare"}
        os.replace(tmp_bin, out)
        if mask_path:
            os.replace(tmp_mask, mask_path)
        out.with_name(out.name + ".json").write_text(json.dumps(sidecar, indent=1) + "\n")
        return sidecar
    finally:
        for p in (tmp_bin, tmp_mask):
            p.unlink(missing_ok=True)


def _chain(*iterables):
    for it in iterables:
        yield from it


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text or JSONL into packed token files for train (data.source)")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each) or .jsonl files (one record a line)")
    p.add_argument("--out", required=True, help="output .bin; writes OUT.json (sidecar) and, for chat, a .mask.bin")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json, a directory holding one, or 'byte'")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (train.seq_len)")
    p.add_argument("--format", default="auto", choices=[f.value for f in Format],
                   help="text, chat (loss on responses only), or auto: chat when records have the chat fields")
    p.add_argument("--field", default="text", help="JSONL text field (format text)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages", help="a list of {role, content}; loss on assistant turns")
    p.add_argument("--no-pack", action="store_true", help="chat: one example per sequence instead of packing")
    p.add_argument("--shuffle-seed", type=int, help="shuffle records first (in memory) so the held-out tail is random")
    p.add_argument("--model", help="an HF checkpoint directory: check the tokenizer against its vocab_size")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    vocab = None
    if args.model:
        from lohan_jax.hf.checkpoint import spec_from_checkpoint
        vocab = spec_from_checkpoint(args.model).vocab_size
    side = prepare(args.inputs, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, fmt=args.format,
                   fields=Fields(args.field, args.prompt_field, args.response_field, args.messages_field),
                   pack=not args.no_pack, model_vocab_size=vocab, shuffle_seed=args.shuffle_seed)
    print(f"wrote {args.out}: {side['rows']} sequences of {side['seq_len']} tokens from {side['examples']} "
          f"{'documents' if side['format'] == 'text' else 'examples'} ({side['loss_tokens']} tokens in the loss"
          f"{', ' + str(side['truncated']) + ' truncated' if side['truncated'] else ''}"
          f"{', mask ' + side['mask'] if side['mask'] else ''}); train with data.source={args.out} "
          f"train.seq_len={side['seq_len']}")
    return 0
