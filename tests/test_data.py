"""Tests for lohan_jax.data: tokenizers, sources, deterministic batches and the held-out split."""

import json
import time

import numpy as np
import pytest

from lohan_jax.data import (
    ByteTokenizer,
    HFTokenizer,
    SyntheticTokenDataset,
    TokenDataset,
    load_tokenizer,
    open_dataset,
)

SENTENCES = ["the cat sat on the mat", "a dog ate the bone", "the bird sang a song"]


def arange_dataset(num_tokens=10_000, seq_len=16, batch_size=4, seed=0, eval_fraction=0.01):
    """A stream whose token ids equal their positions, so every window says where it came from."""
    stream = np.arange(num_tokens, dtype=np.uint32)
    return TokenDataset(stream, seq_len=seq_len, batch_size=batch_size, seed=seed, eval_fraction=eval_fraction)


def write_hf_tokenizer(directory, special_tokens=("[UNK]", "</s>")):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, tokenizers.trainers.WordLevelTrainer(special_tokens=list(special_tokens)))
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_bin(path, ids, dtype, sidecar=None):
    np.asarray(ids, dtype=dtype).tofile(path)
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return path


# Tokenizers


def test_byte_tokenizer_round_trips_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🚀"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [tok.eos_id]])) == text  # eos is dropped
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_hf_tokenizer_from_file_and_directory(tmp_path):
    path = write_hf_tokenizer(tmp_path)
    for spec in (path, str(tmp_path)):
        tok = load_tokenizer(str(spec))
        assert isinstance(tok, HFTokenizer)
        assert tok.eos_id == tok._tok.token_to_id("</s>")
        ids = tok.encode("the cat sat")
        assert ids.dtype == np.int32 and len(ids) == 3 and ids.max() < tok.vocab_size
        assert tok.decode(ids) == "the cat sat"


def test_hf_tokenizer_without_eos_asks_for_one(tmp_path):
    path = write_hf_tokenizer(tmp_path, special_tokens=("[UNK]",))
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        HFTokenizer(path, eos_token="<nope>")
    assert HFTokenizer(path, eos_token="[UNK]").eos_id == 0


def test_hf_tokenizer_reads_eos_from_tokenizer_config(tmp_path):
    path = write_hf_tokenizer(tmp_path, special_tokens=("[UNK]", "</s>", "<end>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    tok = HFTokenizer(path)
    assert tok.eos_token == "<end>" and tok.eos_id == 2


def test_load_tokenizer_specs_and_errors(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(""), ByteTokenizer)  # how a config file says "not set"
    with pytest.raises(ValueError, match="does not exist.*'byte'.*tokenizer.json"):
        load_tokenizer("gpt2")
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a .json file"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


# Sources


def test_pydoc_corpus_is_english_text_and_fast():
    start_s = time.perf_counter()
    ds = open_dataset("builtin:pydoc", tokenizer="byte", seq_len=128, batch_size=2, seed=0)
    elapsed_s = time.perf_counter() - start_s
    assert elapsed_s < 1.0
    assert ds.num_train_tokens > 400_000 and ds.vocab_size == 257
    assert int((np.asarray(ds.stream) == 256).sum()) > 50  # one eos per topic
    text = ByteTokenizer().decode(ds.stream[:20_000])
    assert "the" in text and "\ufffd" not in text
    ds.check_vocab(257)


def test_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "a.txt").write_text("first ü")
    tok = ByteTokenizer()
    ds = open_dataset(str(tmp_path), tokenizer=tok, seq_len=4, batch_size=2, seed=0, eval_fraction=0.0)
    docs = tok.decode(np.where(ds.stream == tok.eos_id, ord("|"), ds.stream))
    assert docs == "first ü|second|third|"  # sorted paths, each document ended by eos
    single = open_dataset(str(tmp_path / "a.txt"), seq_len=4, batch_size=1, seed=0, eval_fraction=0.0)
    assert single.stream.dtype == np.uint16 and len(single.stream) == len("first ü".encode()) + 1


def test_text_with_hf_tokenizer(tmp_path):
    tok = HFTokenizer(write_hf_tokenizer(tmp_path))
    (tmp_path / "corpus.txt").write_text(" ".join(SENTENCES * 20))
    ds = open_dataset(str(tmp_path / "corpus.txt"), tokenizer=tok, seq_len=8, batch_size=2, seed=0, eval_fraction=0.1)
    assert ds.vocab_size == tok.vocab_size and ds.stream[-1] == tok.eos_id
    assert tok.decode(ds.batch(0)["tokens"][0]).split()[0] in set(" ".join(SENTENCES).split())


@pytest.mark.parametrize("dtype_name, dtype, top_id", [("uint16", np.uint16, 65_535), ("uint32", np.uint32, 150_000)])
def test_bin_memmap_round_trip(tmp_path, dtype_name, dtype, top_id):
    ids = np.arange(5_000) % 1000
    ids[1234] = top_id
    path = write_bin(tmp_path / "train.bin", ids, dtype, sidecar={"dtype": dtype_name, "vocab_size": top_id + 1})
    ds = open_dataset(str(path), seq_len=32, batch_size=3, seed=1)
    assert isinstance(ds.stream, np.memmap) and ds.stream.dtype == dtype
    np.testing.assert_array_equal(ds.stream, ids)
    assert ds.vocab_size == top_id + 1 and ds.max_token_id == top_id
    assert ds.batch(0)["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match=f"max token id is {top_id}.*vocab_size is 1000"):
        ds.check_vocab(1000)


def test_bin_dtype_from_argument_or_stem_sidecar(tmp_path):
    path = write_bin(tmp_path / "a.bin", np.arange(100), np.uint32)
    ds = open_dataset(str(path), token_dtype="uint32", seq_len=4, batch_size=1, seed=0, eval_fraction=0.0)
    with pytest.raises(ValueError, match="no sidecar a.bin.json"):
        open_dataset(str(path), token_dtype="", seq_len=4, batch_size=1, seed=0)  # "" means not set
    assert ds.vocab_size == 100  # no declared vocab: one more than the largest id
    path = write_bin(tmp_path / "b.bin", np.arange(100), np.uint16)
    (tmp_path / "b.json").write_text(json.dumps({"dtype": "uint16"}))
    np.testing.assert_array_equal(
        open_dataset(str(path), seq_len=4, batch_size=1, seed=0, eval_fraction=0.0).stream, np.arange(100)
    )


def test_bin_errors(tmp_path):
    kw = dict(seq_len=4, batch_size=1, seed=0, eval_fraction=0.0)
    bare = write_bin(tmp_path / "bare.bin", np.arange(100), np.uint16)
    with pytest.raises(ValueError, match="no sidecar bare.bin.json.*token_dtype"):
        open_dataset(str(bare), **kw)
    with pytest.raises(ValueError, match="'int8' .* not one of"):
        open_dataset(str(bare), token_dtype="int8", **kw)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 101)
    with pytest.raises(ValueError, match="101 bytes, not a whole number of uint16"):
        open_dataset(str(odd), token_dtype="uint16", **kw)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        open_dataset(str(tmp_path / "empty.bin"), token_dtype="uint16", **kw)
    side = write_bin(tmp_path / "side.bin", np.arange(100), np.uint16, sidecar={"dtype": "uint16", "vocab_size": 100})
    with pytest.raises(ValueError, match="token_dtype='uint32' was passed but .*side.bin.json says 'uint16'"):
        open_dataset(str(side), token_dtype="uint32", **kw)
    with pytest.raises(ValueError, match="vocab_size=50 was passed .* says 100"):
        open_dataset(str(side), vocab_size=50, **kw)


def test_source_errors(tmp_path):
    kw = dict(seq_len=4, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="does not exist; expected 'builtin:pydoc'"):
        open_dataset(str(tmp_path / "missing.txt"), **kw)
    with pytest.raises(ValueError, match="unknown built-in corpus 'wiki'.*pydoc"):
        open_dataset("builtin:wiki", **kw)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown extension"):
        open_dataset(str(tmp_path / "data.csv"), **kw)
    with pytest.raises(ValueError, match="holds no .txt files"):
        open_dataset(str(tmp_path), **kw)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        open_dataset(str(tmp_path / "latin1.txt"), **kw)
    with pytest.raises(ValueError, match="synthetic:VOCAB_SIZE"):
        open_dataset("synthetic:big", **kw)
    with pytest.raises(ValueError, match="names vocab size 100 but vocab_size=200"):
        open_dataset("synthetic:100", vocab_size=200, **kw)
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocab_size 257"):
        open_dataset("builtin:pydoc", vocab_size=100, **kw)


# Batches


def test_batches_are_deterministic_and_differ_across_steps():
    a, b = arange_dataset(seed=3), arange_dataset(seed=3)
    for step, micro in [(0, 0), (7, 2), (123_456, 0)]:
        for key in ("tokens", "targets", "loss_mask"):
            np.testing.assert_array_equal(a.batch(step, micro)[key], b.batch(step, micro)[key])
    assert not np.array_equal(a.batch(0)["tokens"], a.batch(1)["tokens"])
    assert not np.array_equal(a.batch(0, 0)["tokens"], a.batch(0, 1)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], arange_dataset(seed=4).batch(0)["tokens"])


def test_batch_shapes_and_targets_shift_by_one():
    ds = arange_dataset(seq_len=16, batch_size=4)
    batch = ds.batch(5, 1)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (4, 16)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)  # positions: a contiguous window
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    assert (batch["loss_mask"] == 1).all()


def test_held_out_tail_never_overlaps_training_windows():
    ds = arange_dataset(num_tokens=2_000, seq_len=16, batch_size=8, eval_fraction=0.05)
    assert (ds.num_train_tokens, ds.num_eval_tokens) == (1_900, 100)
    train_max = max(int(ds.batch(step, micro)["targets"].max()) for step in range(400) for micro in range(2))
    assert train_max == ds.num_train_tokens - 1  # windows reach the boundary but never cross it
    train_min = min(int(ds.batch(step)["tokens"].min()) for step in range(400))
    assert train_min == 0
    evals = list(ds.eval_batches(3))
    assert min(int(b["tokens"].min()) for b in evals) == ds.num_train_tokens
    assert max(int(b["targets"].max()) for b in evals) < 2_000
    for batch in evals:
        np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)


def test_eval_batches_repeat_and_cycle_when_tail_is_small(caplog):
    ds = arange_dataset(num_tokens=2_000, seq_len=16, batch_size=8, eval_fraction=0.05)
    assert ds.num_eval_windows == 6
    first, again = list(ds.eval_batches(2)), list(ds.eval_batches(2))
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    starts = first[0]["tokens"][:, 0]
    np.testing.assert_array_equal(starts, 1_900 + 16 * (np.arange(8) % 6))
    assert "repeating" in caplog.text


def test_dataset_errors():
    with pytest.raises(ValueError, match="training split has 100 tokens .*needs seq_len \\+ 1 = 129"):
        arange_dataset(num_tokens=100, seq_len=128, eval_fraction=0.0)
    with pytest.raises(ValueError, match="held-out split .* has 10 tokens .*seq_len \\+ 1 = 17.*eval_fraction to 0"):
        arange_dataset(num_tokens=1_000, seq_len=16, eval_fraction=0.01)
    with pytest.raises(ValueError, match="eval_fraction must be in \\[0, 1\\)"):
        arange_dataset(eval_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        arange_dataset(seq_len=0)
    ds = arange_dataset(eval_fraction=0.0)
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        ds.batch(-1)
    with pytest.raises(ValueError, match="no held-out split"):
        next(ds.eval_batches(1))
    with pytest.raises(ValueError, match="max token id is 9999 but the model's vocab_size is 512"):
        ds.check_vocab(512)


def test_synthetic_is_deterministic_in_range_and_endless():
    ds = open_dataset("synthetic:70000", seq_len=32, batch_size=4, seed=5)
    assert isinstance(ds, SyntheticTokenDataset) and ds.vocab_size == 70_000
    np.testing.assert_array_equal(ds.batch(10**9)["tokens"], ds.batch(10**9)["tokens"])
    batch = ds.batch(3, 1)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].min() >= 0 and batch["tokens"].max() < 70_000
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    assert not np.array_equal(ds.batch(0)["tokens"], next(ds.eval_batches(1))["tokens"])
    ds.check_vocab(70_000)
    with pytest.raises(ValueError, match="max token id is 69999"):
        ds.check_vocab(65_536)
    assert open_dataset("synthetic", seq_len=4, batch_size=1, seed=0).vocab_size == 257  # byte tokenizer
    assert open_dataset("synthetic:", vocab_size=99, seq_len=4, batch_size=1, seed=0).vocab_size == 99
