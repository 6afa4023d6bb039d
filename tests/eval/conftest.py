"""A tiny random flt_jax model over the bytes vocabulary, a plain per-example
log-likelihood to check the eval scorers against, and the sharded evaluator of a model
on this process's first device (the default mesh: params laid out as in training)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flt_jax.data.tokenizers import BytesTokenizer
from flt_jax.eval.evaluator import Evaluator
from flt_jax.model.looped import LoopedTransformer
from flt_jax.parallel import config as parallel_config
from flt_jax.parallel import mesh as mesh_lib
from flt_jax.parallel import sharding as sharding_lib
from flt_jax.train import state as state_lib
from tests.helpers.models import model_config, random_params


def one_device_evaluator(model, rows, token_bytes_V=None):
  """The Evaluator of `model` on one device, its params sharded by their logical axes."""
  mesh_config = parallel_config.get_config()
  mesh = mesh_lib.make_mesh(mesh_config, jax.devices()[:1])
  rules = sharding_lib.logical_rules(mesh_config)
  boxed = state_lib.abstract_params(model, jax.random.key(0), 8)
  if token_bytes_V is None:
    token_bytes_V = np.ones([model.cfg.vocab_size], np.int32)
  return Evaluator(
    model,
    mesh,
    rules,
    sharding_lib.state_shardings(boxed, mesh, rules),
    rows=rows,
    token_bytes_V=token_bytes_V,
  )


@pytest.fixture(scope="session")
def make_evaluator():
  return one_device_evaluator


@functools.cache
def _forward(model, loops):
  """Compiled (params, tokens_1xT) -> logits."""
  return jax.jit(lambda p, t: model.apply({"params": p}, t, loops))


@dataclasses.dataclass(frozen=True)
class TinyLM:
  model: LoopedTransformer
  params: dict
  tokenizer: BytesTokenizer

  def logits(self, tokens, loops):
    """[T, V] float64 logits of one unpadded sequence."""
    out = _forward(self.model, loops)(self.params, jnp.asarray([list(tokens)], jnp.int32))
    return np.asarray(out[0], np.float64)

  def loglikelihood(self, context, continuation, loops, max_len):
    """(sum log-prob of the continuation, all greedy): one unpadded forward pass of the
    sequence's last max_len + 1 tokens, float64 log-softmax."""
    sequence = (list(context) + list(continuation))[-(max_len + 1) :]
    logits = self.logits(sequence[:-1], loops)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    n = len(continuation)
    targets = np.asarray(sequence[1:])[-n:]
    rows = np.arange(len(sequence) - 1)[-n:]
    return float(logprobs[rows, targets].sum()), bool(np.all(logits[rows].argmax(-1) == targets))


@pytest.fixture(scope="session")
def tiny_lm():
  tokenizer = BytesTokenizer()
  cfg = model_config(
    n_layer=2,
    d_model=32,
    n_head=2,
    n_kv_head=2,
    vocab_size=tokenizer.vocab_size,
    seq_len=32,
    loops=2,
    window_pattern="L",
    kv_lora_rank=0,
  )
  return TinyLM(LoopedTransformer(cfg), random_params(cfg), tokenizer)
