"""Question: does a LLaMA-architecture Hugging Face checkpoint of >= 1B parameters (bf16 safetensors, sharded)
import into the offload engine, fine-tune through `lohan-jax train` until held-out loss falls, export back to the
same layout, and load in transformers with logits equal to ours?

Steps (each timed; every artefact under --workdir):
  1. a BPE tokenizer.json trained on Python's pydoc topics, written with the topics to pydoc.txt;
  2. LlamaForCausalLM with random weights (1.1B: 24 layers, hidden 2048, GQA 32/4 heads), save_pretrained in
     bf16, sharded (1 GB shards), tokenizer files beside it;
  3. `lohan-jax prepare` (packing, checked against the model's vocab) and `lohan-jax train` with
     hf.checkpoint / hf.export_dir, offload engine, held-out loss every few steps, one traced step;
  4. transformers loads the export (CPU, fp32) and we load it too (fp32, matmul precision highest): logits of a
     few held-out sequences compared; `lohan-jax report` on the run directory.
A row goes to experiments/results/hf_finetune.jsonl (RESULTS.md schema, logits_max_abs_diff).

usage (GPU machine, < 8 min on one H100):  PYTHONPATH=. python3 experiments/hf_finetune_e2e.py
       (CPU, ~1 min, a tiny model):          PYTHONPATH=. python3 experiments/hf_finetune_e2e.py --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Model shape, training geometry, checkpoint/export shard sizes and the logits tolerance (fp32 on both sides; the
# 1B model's logits pass through 24 layers of GPU vs CPU fp32 reductions).
SIZES = {
    # pydoc gives ~112k tokens at vocab 4096: ~415 training rows of 257, so 60 steps of 8 stay near one epoch
    "1b": dict(hidden=2048, layers=24, heads=32, kv=4, ffn=5632, vocab=4096, seq=256, batch=8, steps=60,
               eval_every=10, lr=3e-4, shard="1GB", export_shard_gib=1.0, tol=2e-2),
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, ffn=128, vocab=384, seq=64, batch=4, steps=30, eval_every=10,
                 lr=3e-3, shard="40KB", export_shard_gib=5e-5, tol=1e-4),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_corpus_and_tokenizer(work: Path, vocab: int) -> tuple[Path, Path]:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lohan_jax.data import pydoc_documents

    docs = pydoc_documents()
    corpus = work / "pydoc.txt"
    corpus.write_text("\n\n".join(docs))
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = work / "tokenizer.json"
    tok.save(str(path))
    return corpus, path


def make_checkpoint(work: Path, size: dict, tokenizer: Path) -> tuple[Path, int]:
    import tokenizers
    import torch
    import transformers

    vocab = tokenizers.Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise straight in bf16: half the memory and time
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = work / "checkpoint"
    model.save_pretrained(ckpt, max_shard_size=size["shard"])
    (ckpt / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return ckpt, n_params


def lohan(args: list[str], log_path: Path, timeout_s: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log_path, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lohan_jax", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"lohan-jax {args[0]} exited {proc.returncode}:\n" + log_path.read_text()[-3000:])


def compare_logits(export: Path, data_bin: Path, seq: int, n_seq: int = 4) -> tuple[float, float]:
    """(max |ours - transformers|, max |logits|) on the first held-out rows, both in fp32."""
    import numpy as np
    import torch
    import transformers

    rows = np.memmap(data_bin, dtype=json.loads(data_bin.with_name(data_bin.name + ".json").read_text())["dtype"],
                     mode="r").reshape(-1, seq + 1)
    tokens = np.asarray(rows[-n_seq:, :seq], dtype=np.int64)  # the held-out tail
    model = transformers.AutoModelForCausalLM.from_pretrained(export).float().eval()
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)).logits.numpy()
    del model

    import jax
    import jax.numpy as jnp

    from lohan_jax.hf import HFCheckpoint
    from lohan_jax.models import build_model

    with HFCheckpoint(export) as ckpt:
        spec, params = ckpt.spec, ckpt.params()
    ours_model = build_model(spec, jnp.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(ours_model.apply)(params, jnp.asarray(tokens, jnp.int32)))
    return float(np.abs(ours - hf).max()), float(np.abs(hf).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the script's own test)")
    ap.add_argument("--workdir", help="artefacts here (default: a new temporary directory)")
    ap.add_argument("--out", help="results JSONL (default experiments/results/hf_finetune.jsonl; --tiny: workdir)")
    ap.add_argument("--steps", type=int, help="override the number of training steps")
    args = ap.parse_args()
    size = dict(SIZES["tiny" if args.tiny else "1b"])
    if args.steps:
        size["steps"] = args.steps
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (work / "hf_finetune.jsonl" if args.tiny else
                                            REPO / "experiments/results/hf_finetune.jsonl")
    t_start, times = time.perf_counter(), {}
    row = {"experiment": "hf_finetune_e2e", "system": "lohan_jax", "n_gpus": 1, "seq_len": size["seq"],
           "batch_tokens": size["batch"] * size["seq"], "steps": size["steps"]}
    try:
        t = time.perf_counter()
        corpus, tokenizer = write_corpus_and_tokenizer(work, size["vocab"])
        ckpt, n_params = make_checkpoint(work, size, tokenizer)
        shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
        times["create_s"] = time.perf_counter() - t
        row.update(model=f"llama-{n_params / 1e9:.2f}b-random" if not args.tiny else "llama-tiny-random",
                   params=n_params, checkpoint_shards=len(shards), checkpoint_dtype="bfloat16")
        log(f"checkpoint: {n_params / 1e9:.3f}B params in {len(shards)} bf16 shards ({times['create_s']:.0f} s)")

        t = time.perf_counter()
        data_bin = work / "data" / "pydoc.bin"
        lohan(["prepare", str(corpus), "--tokenizer", str(ckpt / "tokenizer.json"), "--seq-len", str(size["seq"]),
               "--out", str(data_bin), "--model", str(ckpt)], work / "prepare.log", 300)
        times["prepare_s"] = time.perf_counter() - t
        log(f"prepared {json.loads(data_bin.with_name('pydoc.bin.json').read_text())['rows']} sequences")

        t = time.perf_counter()
        run_dir, export = work / "run", work / "export"
        sets = {"hf.checkpoint": ckpt, "hf.export_dir": export, "data.source": data_bin, "data.eval_fraction": 0.05,
                "train.seq_len": size["seq"], "train.batch_size": size["batch"], "train.steps": size["steps"],
                "train.eval_every": size["eval_every"], "train.eval_batches": 2, "train.log_every": 1,
                "train.engine": "offload", "optim.lr": size["lr"], "optim.warmup_steps": 5,
                "optim.weight_decay": 0.0, "offload.timeline_step": 3, "hf.export_shard_gib": size["export_shard_gib"]}
        lohan(["train", "--no-progress", "--run-dir", str(run_dir),
               *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))], work / "train.log", 420)
        times["train_s"] = time.perf_counter() - t
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        train = [r for r in rows if "train/loss" in r]
        final = rows[-1]
        row.update(step_s=final["perf/step_s"], tokens_per_s=final["perf/tokens_per_s"],
                   tflops_6n=final["perf/tflops"], mfu=final.get("perf/mfu"),
                   train_loss_first=train[0]["train/loss"], train_loss_last=train[-1]["train/loss"],
                   eval_loss_first=evals[0], eval_loss_final=evals[-1], eval_ppl_final=final.get("eval/ppl"),
                   eval_loss_fell=evals[-1] < evals[0], export_shards=len(list(export.glob("*.safetensors"))))
        log(f"trained {size['steps']} steps in {times['train_s']:.0f} s: held-out loss {evals[0]:.3f} -> "
            f"{evals[-1]:.3f}, {final['perf/tokens_per_s']:.0f} tokens/s")

        t = time.perf_counter()
        diff, scale = compare_logits(export, data_bin, size["seq"])
        times["compare_s"] = time.perf_counter() - t
        lohan(["report", str(run_dir)], work / "report.log", 120)
        row.update(logits_max_abs_diff=diff, logits_max_abs=scale, tolerance=size["tol"])
        ok = diff < size["tol"] and row["eval_loss_fell"]
        row["status"] = "ok" if ok else "failed"
        if not ok:
            row["error"] = (f"logits differ by {diff:.3g} (tolerance {size['tol']})" if diff >= size["tol"]
                            else "held-out loss did not fall")
        log(f"logits max |diff| {diff:.3g} (max |logit| {scale:.3g}); report {run_dir / 'report.md'}")
    except Exception as e:  # noqa: BLE001 (a failure is a result too)
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        log(f"FAILED: {row['error']}")
    row.update({k: round(v, 2) for k, v in times.items()}, total_s=round(time.perf_counter() - t_start, 1),
               workdir=str(work), tiny=args.tiny)
    from lohan_jax.metrics import append_result
    if "jax" not in sys.modules:
        import jax  # noqa: F401 (the row's device field)
    append_result(out, row)
    log(f"row appended to {out}: status {row['status']}, total {row['total_s']} s")
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
