"""Tokenizers and synthetic tasks (independent solvers)."""

import numpy as np
import pytest

from flt_jax.constants import IGNORE_LABEL
from flt_jax.data import config as config_lib
from flt_jax.data import synthetic
from flt_jax.data import tokenizers as tok_lib

TEXTS = [
  "hello world",
  "naïve café – 日本語テキスト 🙂",
  "def f(x):\n  return x\t# ok",
  "ß" * 7 + " Ωmega",
  "",
]
CORPUS = [
  (f"def func_{i}(a, b):\n    return a + b * {i}  # café 日本 🙂\n") * 3 for i in range(200)
]


def _check_roundtrip(tok, texts):
  for s in texts:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert int(tok.token_bytes[ids].sum()) == len(s.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.token_bytes.shape == (tok.vocab_size,)
  assert tok.token_bytes.dtype == np.int32
  assert tok.token_bytes[tok.eos_id] == 0


def test_bytes_roundtrip():
  tok = tok_lib.BytesTokenizer()
  assert tok.vocab_size == 257 and tok.eos_id == 256
  _check_roundtrip(tok, TEXTS)


def test_bpe_roundtrip_deterministic_and_file(tmp_path):
  tok = tok_lib.train_bpe(CORPUS, 400)
  _check_roundtrip(tok, TEXTS + CORPUS[:3])
  assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges
  tok2 = tok_lib.train_bpe(CORPUS, 400)
  assert tok2._tok.to_str() == tok._tok.to_str()  # pylint: disable=protected-access
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tok_lib.load_tokenizer_file(path)
  assert loaded.eos_id == tok.eos_id
  np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
  _check_roundtrip(loaded, TEXTS)
  # disk cache: second call loads the file, same result
  c1 = tok_lib.bpe_from_texts(CORPUS[:50], 300, str(tmp_path / "c.json"))
  tok_lib._BPE_CACHE.clear()  # pylint: disable=protected-access
  c2 = tok_lib.bpe_from_texts(CORPUS[:50], 300, str(tmp_path / "c.json"))
  assert c1.encode(CORPUS[0]) == c2.encode(CORPUS[0])


def test_token_id_beyond_vocab_is_error():
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok_lib.BytesTokenizer().decode([65, 300])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok_lib.train_bpe(CORPUS[:20], 300).decode([10**6])


def _solve_multihop(text):
  table_part, query = text.split("|")
  table = {}
  for pair in table_part.split(","):
    a, b = pair.split(">")
    assert int(a) not in table
    table[int(a)] = int(b)
  x, word, k = query.split("?")[0].split()
  assert word == "hops"
  x, k = int(x), int(k)
  for _ in range(k):
    x = table[x]
  return x, k


def _solve_modarith(text, p):
  if ";" in text:  # chain: v_i = a op b ;
    env = {}
    for stmt in text.split(";")[:-1]:
      name, expr = stmt.split("=")
      env[name.strip()] = eval(expr, {}, dict(env)) % p  # pylint: disable=eval-used
    target = text.split(";")[-1].split("?")[0].strip()
    return env[target], len(env) - 1
  expr = text.split("=")[0]
  return eval(expr) % p, expr.count("(")  # pylint: disable=eval-used


def _examples(d, split, n=150):
  task = synthetic.make_task(d)
  for i in range(n):
    ex = task.example(split, i)
    prompt = task.tokenizer.decode(ex.tokens[: ex.answer_start])
    answer = task.tokenizer.decode(ex.tokens[ex.answer_start : ex.answer_end])
    assert ex.tokens[-1] == task.tokenizer.eos_id
    assert len(ex.tokens) <= task.max_length()
    yield task, ex, prompt, answer


def test_multihop_matches_solver_and_ranges():
  d = config_lib.get_config()
  d.source = "multihop"
  d.multihop.num_nodes, d.multihop.hops_min, d.multihop.hops_max = 9, 2, 5
  seen = set()
  for _, ex, prompt, answer in _examples(d, "train"):
    y, k = _solve_multihop(prompt)
    assert int(answer) == y and k == ex.hops_or_depth and 2 <= k <= 5
    seen.add(k)
  assert seen == {2, 3, 4, 5}
  # validation examples differ from train examples
  t = synthetic.make_task(d)
  assert not np.array_equal(t.example("train", 0).tokens, t.example("validation", 0).tokens)


@pytest.mark.parametrize("form", ["chain", "nested"])
def test_modarith_matches_solver_and_ranges(form):
  d = config_lib.get_config()
  d.source = "modarith"
  d.modarith.form, d.modarith.modulus = form, 11
  d.modarith.depth_min, d.modarith.depth_max = 1, 4
  seen = set()
  for _, ex, prompt, answer in _examples(d, "train", 300):
    y, depth = _solve_modarith(prompt, 11)
    assert int(answer) == y, prompt
    assert depth == ex.hops_or_depth and 1 <= depth <= 4
    seen.add(depth)
  assert seen == {1, 2, 3, 4}


def test_synthetic_rows_answer_mask():
  d = config_lib.get_config()
  d.source = "multihop"
  task = synthetic.make_task(d)
  ex = task.example("train", 3)
  row = synthetic.example_to_row(ex, 128, loss_on_answer_only=True)
  pos = np.flatnonzero(row["answer_mask"])
  np.testing.assert_array_equal(row["targets"][pos], ex.tokens[ex.answer_start : ex.answer_end])
  assert (row["targets"][row["answer_mask"] == 0] == IGNORE_LABEL).all()
  row = synthetic.example_to_row(ex, 128, loss_on_answer_only=False)
  n = len(ex.tokens)
  np.testing.assert_array_equal(row["targets"][: n - 1], ex.tokens[1:])
  assert (row["targets"][n - 1 :] == IGNORE_LABEL).all()
  assert (row["segment_ids"][:n] == 1).all() and (row["segment_ids"][n:] == 0).all()


def test_identity_tells_tokenizers_of_the_same_size_apart(tmp_path):
  a = tok_lib.train_bpe(CORPUS, 300)
  b = tok_lib.train_bpe([t.upper() for t in CORPUS], 300)  # other text, same size
  assert a.vocab_size == b.vocab_size == 300
  assert a.identity()["sha256"] != b.identity()["sha256"]
  a.save(str(tmp_path / "a.json"))
  reloaded = tok_lib.load_tokenizer_file(str(tmp_path / "a.json"))
  assert reloaded.identity()["sha256"] == a.identity()["sha256"]
  assert tok_lib.BytesTokenizer().identity() == tok_lib.BytesTokenizer().identity()
  (tmp_path / "bad.json").write_text("not json")
  with pytest.raises(ValueError, match=r"bad.json' is not a readable tokenizer.json \("):
    tok_lib.load_tokenizer_file(str(tmp_path / "bad.json"))
