"""Tests of `lohan-jax prepare` and the packed datasets it feeds: text and JSONL tokenized and packed, chat data
with the loss masked to the responses, deterministic per-epoch shuffling, exact resumption of the data position,
and clear errors for empty data, missing fields and a tokenizer that does not fit the model."""
import json
import logging

import numpy as np
import pytest

from lohan_jax.batches import step_batch
from lohan_jax.cli import main
from lohan_jax.data import ByteTokenizer, PackedDataset, SyntheticTokenDataset, TokenDataset, open_dataset
from lohan_jax.prepare import Fields, chat_example, prepare

tokenizers = pytest.importorskip("tokenizers")

WORDS = "the cat sat on a mat and dog ate bone bird sang song question answer why how".split()


def write_tokenizer(directory, words=WORDS):
    """A WordLevel tokenizer.json over `words` plus [UNK] and </s> (ids 0 and 1)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_rows(out, seq_len):
    side = json.loads(out.with_name(out.name + ".json").read_text())
    ids = np.fromfile(out, dtype=side["dtype"]).reshape(-1, seq_len + 1)
    mask = np.fromfile(out.with_name(side["mask"]), np.uint8).reshape(ids.shape) if side["mask"] else None
    return side, ids, mask


# ---- text ------------------------------------------------------------------------------------------------------
def test_text_files_are_cut_into_rows(tmp_path):
    docs = ["hello world " * 7, "second document"]
    paths = []
    for i, d in enumerate(docs):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(d)
    side = prepare(paths, tmp_path / "out.bin", tokenizer="byte", seq_len=15)
    stream = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist() + [256] for d in docs])
    rows = len(stream) // 16
    assert (side["rows"], side["seq_len"], side["format"], side["mask"]) == (rows, 15, "text", None)
    assert side["dropped_tokens"] == len(stream) - rows * 16 and side["vocab_size"] == 257
    _, ids, _ = read_rows(tmp_path / "out.bin", 15)
    np.testing.assert_array_equal(ids.reshape(-1), stream[: rows * 16])
    assert not (tmp_path / "out.mask.bin").exists() and not list(tmp_path.glob("*.partial"))


def test_jsonl_field_and_hf_tokenizer(tmp_path):
    tok = write_tokenizer(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": "the cat sat on a mat", "id": 1}, {"body": "a dog ate"}])
    side = prepare([data], tmp_path / "o.bin", tokenizer=str(tok), seq_len=4, fields=Fields(text="body"))
    _, ids, _ = read_rows(tmp_path / "o.bin", 4)
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    expected = [vocab[w] for w in "the cat sat on a mat".split()] + [1] + [vocab[w] for w in "a dog ate".split()] + [1]
    np.testing.assert_array_equal(ids.reshape(-1), expected[:10])
    assert side["tokenizer_sha256"] and side["eos_id"] == 1 and side["dtype"] == "uint16"


# ---- chat ------------------------------------------------------------------------------------------------------
def test_chat_masks_prompts_and_packs(tmp_path):
    tok = write_tokenizer(tmp_path)
    records = [{"prompt": "why the cat", "response": "the mat"},  # 3 + 2 + eos = 6 tokens
               {"prompt": "how", "response": "a dog ate a bone"},  # 1 + 5 + eos = 7
               {"prompt": "the bird", "response": "sang"}]  # 2 + 1 + eos = 4
    side = prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "c.bin", tokenizer=str(tok), seq_len=11)
    assert side["format"] == "chat" and side["mask"] == "c.mask.bin"
    _, ids, mask = read_rows(tmp_path / "c.bin", 11)
    # row 0: example 1 (6) + no room for example 2 (7) -> padded; row 1: example 2 (7) + example 3 (4) = 11... + pad
    assert ids.shape == (2, 12)
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1], [0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0])
    assert ids[0, 5] == 1 and ids[1, 6] == 1 and ids[1, 10] == 1  # eos ends every response
    assert side["loss_tokens"] == int(mask.sum()) == 3 + 6 + 2

    unpacked = prepare([tmp_path / "c.jsonl"], tmp_path / "u.bin", tokenizer=str(tok), seq_len=11, pack=False)
    assert unpacked["rows"] == 3
    short = prepare([tmp_path / "c.jsonl"], tmp_path / "s.bin", tokenizer=str(tok), seq_len=4)
    assert short["truncated"] == 2  # examples of 6 and 7 tokens cut to rows of 5


def test_messages_learn_the_assistant_only():
    tok = ByteTokenizer()
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = chat_example(record, tok, Fields(), "x")
    text = "".join(chr(i) if i < 256 else "|" for i in ids)
    assert text == "<|user|>\nhi\n<|assistant|>\nyo|"
    learned = "".join(c for c, m in zip(text, mask, strict=True) if m)
    assert learned == "yo|"  # the response and its eos
    with pytest.raises(ValueError, match="x: no 'assistant' message"):
        chat_example({"messages": [{"role": "user", "content": "hi"}]}, tok, Fields(), "x")


def test_masked_dataset_returns_the_mask(tmp_path):
    tok = write_tokenizer(tmp_path)
    records = [{"prompt": "why the cat", "response": f"the {w}"} for w in WORDS * 4]
    prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "c.bin", tokenizer=str(tok), seq_len=11)
    _, ids, mask = read_rows(tmp_path / "c.bin", 11)
    ds = open_dataset(str(tmp_path / "c.bin"), seq_len=11, batch_size=3, seed=0, eval_fraction=0.1)
    assert isinstance(ds, PackedDataset) and ds.num_eval_rows == len(ids) // 10
    b = ds.batch(2)
    for i, row in enumerate(ds.rows(2)):
        np.testing.assert_array_equal(b["tokens"][i], ids[row, :-1])
        np.testing.assert_array_equal(b["targets"][i], ids[row, 1:])
        np.testing.assert_array_equal(b["loss_mask"][i], mask[row, 1:])  # the mask of the predicted tokens
    eval_batch = next(ds.eval_batches(1))
    np.testing.assert_array_equal(eval_batch["loss_mask"][0], mask[ds.num_train_rows, 1:])


def test_training_on_chat_data_logs_perplexity(tmp_path):
    """End to end: prepared chat data trains, the loss covers responses only, eval rows carry perplexity."""
    from lohan_jax.config import load_config
    from lohan_jax.report import write_report
    from lohan_jax.train import run_training

    tok = write_tokenizer(tmp_path)
    records = [{"prompt": f"why the {a}", "response": f"the {b} sat"} for a in WORDS for b in WORDS[:6]]
    prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "c.bin", tokenizer=str(tok), seq_len=15)
    cfg = load_config(None, ["model.name=gpt-tiny", "model.vocab_size=32", "train.seq_len=15", "train.batch_size=4",
                             "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.engine=reference",
                             "optim.lr=1e-2",
                             f"data.source={tmp_path / 'c.bin'}", f"data.tokenizer={tok}", "data.eval_fraction=0.1"])
    run_training(cfg, run_dir=tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert len(evals) == 2  # after step 2 (index 1) and the final one
    for r in evals:
        assert r["eval/ppl"] == pytest.approx(np.exp(r["eval/loss"]), rel=1e-6)
    report = write_report(tmp_path / "run").read_text()
    assert "perplexity" in report and (tmp_path / "run" / "report-loss.png").is_file()


# ---- shuffling and resumption ------------------------------------------------------------------------------------
def packed(n_rows=23, seq_len=3, batch_size=4, micro_batches=1, seed=0, eval_fraction=0.0):
    stream = np.repeat(np.arange(n_rows, dtype=np.uint32), seq_len + 1)  # every token says which row it is in
    return PackedDataset(stream, seq_len=seq_len, batch_size=batch_size, seed=seed, micro_batches=micro_batches,
                         eval_fraction=eval_fraction)


def test_each_epoch_is_a_permutation():
    ds = packed(n_rows=20, batch_size=4)
    seen = np.concatenate([ds.batch(s)["tokens"][:, 0] for s in range(15)])  # 60 samples = 3 epochs
    epochs = seen.reshape(3, 20)
    for e in epochs:
        assert sorted(e) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(packed(n_rows=20).rows(7), ds.rows(7))  # deterministic
    assert not np.array_equal(packed(n_rows=20, seed=1).rows(0), ds.rows(0))
    assert ds.epoch(5) == 1.0


@pytest.mark.parametrize("make", [
    lambda: packed(n_rows=23, batch_size=2, micro_batches=3, eval_fraction=0.1),
    lambda: TokenDataset(np.arange(5000, dtype=np.uint32), seq_len=8, batch_size=2, seed=3),
    lambda: SyntheticTokenDataset(vocab_size=50, seq_len=8, batch_size=2, seed=3),
], ids=["packed", "stream", "synthetic"])
def test_resuming_at_step_k_reads_the_same_batches(make):
    """Batches are pure functions of (seed, step, micro): a run restarted at step k (a new dataset object, no
    state carried over) reads exactly what the uninterrupted run read from step k on."""
    n_micro = getattr(make(), "micro_batches", 1)
    uninterrupted = make()
    full = [step_batch(uninterrupted, s, n_micro) for s in range(12)]
    resumed = make()
    for s in range(7, 12):
        for key in ("tokens", "targets", "weights"):
            np.testing.assert_array_equal(step_batch(resumed, s, n_micro)[key], full[s][key])


def test_micro_batches_draw_distinct_samples():
    ds = packed(n_rows=24, batch_size=2, micro_batches=3)
    rows = np.concatenate([ds.rows(0, m) for m in range(3)] + [ds.rows(1, m) for m in range(3)])
    assert len(set(rows.tolist())) == 12


# ---- errors ------------------------------------------------------------------------------------------------------
def test_empty_datasets(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty dataset: 1 documents gave 1 tokens, fewer than one sequence"):
        prepare([tmp_path / "empty.txt"], tmp_path / "o.bin", tokenizer="byte", seq_len=8)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty dataset: .*empty.jsonl hold no documents"):
        prepare([tmp_path / "empty.jsonl"], tmp_path / "o.bin", tokenizer="byte", seq_len=8)
    assert not list(tmp_path.glob("o.*"))
    (tmp_path / "one.txt").write_text("abcdefg")
    prepare([tmp_path / "one.txt"], tmp_path / "one.bin", tokenizer="byte", seq_len=3)  # 2 rows of 4
    with pytest.raises(ValueError, match="one.bin: 2 sequences hold none for evaluation at eval_fraction=0.05"):
        open_dataset(str(tmp_path / "one.bin"), seq_len=3, batch_size=1, seed=0, eval_fraction=0.05)


def test_record_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no field 'text' \(fields: 'txt'\)"):
        prepare([bad], tmp_path / "o.bin", tokenizer="byte", seq_len=2)
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        prepare([bad], tmp_path / "o.bin", tokenizer="byte", seq_len=2)
    bad.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'response' must be a string"):
        prepare([bad], tmp_path / "o.bin", tokenizer="byte", seq_len=2)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unknown extension"):
        prepare([tmp_path / "x.csv"], tmp_path / "o.bin", tokenizer="byte", seq_len=2)


def test_tokenizer_must_fit_the_model(tmp_path, caplog):
    (tmp_path / "t.txt").write_text("abc " * 40)
    with pytest.raises(ValueError, match="has 257 ids but the model's vocab_size is 100: the tokenizer does not match"):
        prepare([tmp_path / "t.txt"], tmp_path / "o.bin", tokenizer="byte", seq_len=8, model_vocab_size=100)
    prepare([tmp_path / "t.txt"], tmp_path / "o.bin", tokenizer="byte", seq_len=8)
    kw = dict(seq_len=8, batch_size=1, seed=0, eval_fraction=0.0)
    with pytest.raises(ValueError, match="vocab_size=100 was passed .* says 257.* larger than the model's 100"):
        open_dataset(str(tmp_path / "o.bin"), vocab_size=100, **kw)
    assert open_dataset(str(tmp_path / "o.bin"), vocab_size=512, **kw).vocab_size == 257  # padded tables are fine
    with pytest.raises(ValueError, match=r"packed into sequences of 8 tokens .* train.seq_len=16"):
        open_dataset(str(tmp_path / "o.bin"), **{**kw, "seq_len": 16})
    # a .bin prepared with one tokenizer.json, trained with another: warned, since ids would mean other words
    tok_a, other = write_tokenizer(tmp_path), tmp_path / "other"
    other.mkdir()
    tok_b = write_tokenizer(other, WORDS[:5])
    prepare([tmp_path / "t.txt"], tmp_path / "w.bin", tokenizer=str(tok_a), seq_len=8)
    with caplog.at_level(logging.WARNING):
        open_dataset(str(tmp_path / "w.bin"), tokenizer=str(tok_b), **kw)
    assert "tokenizer.json files differ" in caplog.text


def test_mask_file_problems(tmp_path):
    records = [{"prompt": "ab", "response": "cd"}] * 8
    prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "c.bin", tokenizer="byte", seq_len=4)
    mask = tmp_path / "c.mask.bin"
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(ValueError, match="c.mask.bin has 39 entries but its token file 40"):
        open_dataset(str(tmp_path / "c.bin"), seq_len=4, batch_size=1, seed=0, eval_fraction=0.0)
    mask.unlink()
    with pytest.raises(ValueError, match="c.mask.bin named by the sidecar does not exist"):
        open_dataset(str(tmp_path / "c.bin"), seq_len=4, batch_size=1, seed=0, eval_fraction=0.0)


def test_cli_prepare(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text " * 30)
    assert main(["prepare", str(tmp_path / "t.txt"), "--tokenizer", "byte", "--seq-len", "16",
                 "--out", str(tmp_path / "t.bin")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "train.seq_len=16" in out and (tmp_path / "t.bin.json").is_file()
    assert main(["prepare", str(tmp_path / "t.txt"), "--tokenizer", "byte", "--seq-len", "16",
                 "--out", str(tmp_path / "t.dat")]) == 2
    assert "must end in .bin" in capsys.readouterr().err
