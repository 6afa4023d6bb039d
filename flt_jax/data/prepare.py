"""Offline data preparation: train a tokenizer, tokenise text into shards.

  python -m flt_jax.data.prepare train_tokenizer --source=jsonl \
      --path='data/*.jsonl' --vocab_size=8192 --out=tok/tokenizer.json
  python -m flt_jax.data.prepare tokenize --source=parquet \
      --path='fineweb/*.parquet' --tokenizer=file \
      --tokenizer_path=tok/tokenizer.json --out_dir=shards/

Shards are `shard_00000.bin`, ... (format: flt_jax/data/sources.py), every
document followed by the separator; train on them with data.source='tokens',
data.path='shards/*.bin' (the train/validation split is by shard file) and the
same tokenizer settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import tqdm

from flt_jax.data import config as config_lib
from flt_jax.data import pipeline, sources
from flt_jax.data import tokenizers as tokenizers_lib


def _data_config(args, tokenizer: str):
  d = config_lib.get_config()
  d.source = args.source
  d.path = args.path or ""
  d.text_column = args.text_column
  d.tokenizer = tokenizer
  d.tokenizer_path = getattr(args, "tokenizer_path", "") or ""
  d.bpe_vocab_size = args.vocab_size
  d.bpe_train_bytes = args.max_bytes
  d.eos_token = getattr(args, "eos_token", "") or ""
  if d.source not in ("stdlib", "text", "jsonl", "parquet"):
    raise ValueError(f"--source={d.source!r} is invalid: use stdlib, text, jsonl or parquet")
  config_lib.validate(d, seq_len=2)
  return d


def train_tokenizer(args) -> dict:
  d = _data_config(args, "bpe")
  t0 = time.time()
  texts = sources.training_texts(d, int(args.max_bytes))
  nbytes = sum(len(t.encode("utf-8")) for t in texts)
  tok = tokenizers_lib.train_bpe_checked(texts, int(args.vocab_size), "--max_bytes", args.max_bytes)
  tok.save(args.out)
  n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
  summary = {
    "tokenizer": args.out,
    "vocab_size": tok.vocab_size,
    "documents": len(texts),
    "bytes": nbytes,
    "tokens": n_tokens,
    "bytes_per_token": nbytes / max(n_tokens, 1),
    "seconds": round(time.time() - t0, 2),
  }
  print(json.dumps(summary, indent=2))
  return summary


def tokenize(args) -> dict:
  d = _data_config(args, args.tokenizer)
  tok = pipeline.make_tokenizer(d)
  sp = sources.get_split(d, args.split, tok)
  os.makedirs(args.out_dir, exist_ok=True)
  if isinstance(tok, tokenizers_lib.HFTokenizer):
    tok.save(os.path.join(args.out_dir, "tokenizer.json"))
  shard_tokens = int(args.shard_tokens)
  buf, buf_docs, shard_paths = [], 0, []
  stats = {"documents": 0, "tokens": 0, "bytes": 0}

  def flush():
    nonlocal buf, buf_docs
    if not buf:
      return
    path = os.path.join(args.out_dir, f"shard_{len(shard_paths):05d}.bin")
    sources.write_token_shard(
      path, np.concatenate(buf), vocab_size=tok.vocab_size, eos_id=tok.eos_id, num_docs=buf_docs
    )
    shard_paths.append(path)
    buf, buf_docs = [], 0

  t0 = time.time()
  n_in_buf = 0
  with tqdm.tqdm(total=len(sp.units), desc="tokenize", unit="unit") as bar:
    for unit in sp.units:
      for text in sp.load(unit):
        ids = tok.encode_array(text)
        stats["documents"] += 1
        stats["tokens"] += len(ids)
        stats["bytes"] += len(text.encode("utf-8"))
        buf.append(np.append(ids, np.int32(tok.eos_id)))
        buf_docs += 1
        n_in_buf += len(ids) + 1
        if n_in_buf >= shard_tokens:
          flush()
          n_in_buf = 0
      bar.update(1)
      bar.set_postfix(tokens=stats["tokens"])
  flush()
  summary = dict(
    stats,
    shards=len(shard_paths),
    out_dir=args.out_dir,
    tokenizer=tok.name,
    vocab_size=tok.vocab_size,
    bytes_per_token=stats["bytes"] / max(stats["tokens"], 1),
    seconds=round(time.time() - t0, 2),
  )
  print(json.dumps(summary, indent=2))
  return summary


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m flt_jax.data.prepare", description=__doc__.split("\n\n")[0]
  )
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp):
    sp.add_argument("--source", default="stdlib", help="stdlib | text | jsonl | parquet")
    sp.add_argument(
      "--path",
      default="",
      help="file glob (comma-separated globs allowed, '**' recursive); '' for stdlib",
    )
    sp.add_argument(
      "--text_column", default="text", help="JSONL field / Parquet column holding the text"
    )
    sp.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size")
    sp.add_argument(
      "--max_bytes",
      type=int,
      default=100_000_000,
      help="train BPE on at most this many bytes of text",
    )

  t = sub.add_parser(
    "train_tokenizer", help="train a byte-level BPE on the training split and write tokenizer.json"
  )
  common(t)
  t.add_argument("--out", required=True, help="output tokenizer.json path")
  k = sub.add_parser("tokenize", help="tokenise documents into .bin shards")
  common(k)
  k.add_argument("--tokenizer", default="bytes", help="bytes | bpe | file")
  k.add_argument(
    "--tokenizer_path", default="", help="tokenizer.json for --tokenizer=file (for 'bpe': cache)"
  )
  k.add_argument("--eos_token", default="", help="separator token ('' = detect)")
  k.add_argument("--split", default="all", help="all | train | validation")
  k.add_argument(
    "--shard_tokens", type=int, default=100_000_000, help="tokens per shard (approximate)"
  )
  k.add_argument("--out_dir", required=True)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "train_tokenizer":
      train_tokenizer(args)
    else:
      tokenize(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
