"""Move weights between flt_jax params and the official PyTorch implementation's
state dict (its module names, `transformer.h.{l}.attn.c_q.weight` etc.; torch Linear
weights are [out, in], ours [in, out]).

  params = from_reference(np.load("ref.npz"), model_cfg)      # reference -> flt_jax
  save_reference_npz("out.npz", params, model_cfg)           # flt_jax -> reference
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flt_jax.model.config import ModelConfig

# (module, name in our tree, name in the reference)
_STANDARD_ATTN = ("c_q", "c_k", "c_v", "c_proj")
_MLA_ATTN = ("c_q", "c_kv_down", "c_k_up", "c_v_up", "c_proj")
_MLP = ("c_fc", "c_proj")


def _block_matrices(cfg: ModelConfig):
  attn = _MLA_ATTN if cfg.kv_lora_rank else _STANDARD_ATTN
  return [("attn", n) for n in attn] + [("mlp", n) for n in _MLP]


def _blocks(params):
  return params["blocks"]["layers"]["block"]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Reference state-dict names and their [out, in] shapes for this model config."""
  D, V, hd = cfg.d_model, cfg.padded_vocab_size, cfg.head_dim
  q, kv, r = cfg.n_head * hd, cfg.n_kv_head * hd, cfg.kv_lora_rank
  io = {
    ("attn", "c_q"): (q, D),
    ("attn", "c_k"): (kv, D),
    ("attn", "c_v"): (kv, D),
    ("attn", "c_kv_down"): (r, D),
    ("attn", "c_k_up"): (kv, r),
    ("attn", "c_v_up"): (kv, r),
    ("attn", "c_proj"): (D, q),
    ("mlp", "c_fc"): (4 * D, D),
    ("mlp", "c_proj"): (D, 4 * D),
  }
  shapes = {"transformer.wte.weight": (V, D), "lm_head.weight": (V, D)}
  for layer in range(cfg.n_layer):
    for mod, name in _block_matrices(cfg):
      shapes[f"transformer.h.{layer}.{mod}.{name}.weight"] = io[(mod, name)]
  return shapes


def from_reference(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """Reference state dict (numpy arrays) -> flt_jax params (float32 numpy)."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(want))
  if missing or unexpected:
    raise ValueError(
      f"state dict does not match config.model (n_layer={cfg.n_layer}, "
      f"kv_lora_rank={cfg.kv_lora_rank}): missing {missing[:8]}, unexpected {unexpected[:8]}"
    )
  for name, shape in want.items():
    got = tuple(np.shape(state_dict[name]))
    if got != shape:
      raise ValueError(
        f"{name} has shape {got} but config.model implies {shape} "
        "(check d_model, n_head, n_kv_head, vocab_size, kv_lora_rank)"
      )
  arr = lambda name: np.asarray(state_dict[name], dtype=np.float32)
  block: dict = {"attn": {}, "mlp": {}}
  for mod, name in _block_matrices(cfg):
    stacked = np.stack(
      [arr(f"transformer.h.{l}.{mod}.{name}.weight").T for l in range(cfg.n_layer)]
    )
    block[mod][name] = {"kernel": stacked}
  return {
    "wte": {"embedding": arr("transformer.wte.weight")},
    "lm_head": {"kernel": arr("lm_head.weight").T},
    "blocks": {"layers": {"block": block}},
  }


def to_reference(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """flt_jax params -> reference state dict (float32 numpy, torch layouts)."""
  out = {
    "transformer.wte.weight": np.asarray(params["wte"]["embedding"], np.float32),
    "lm_head.weight": np.asarray(params["lm_head"]["kernel"], np.float32).T.copy(),
  }
  block = _blocks(params)
  for mod, name in _block_matrices(cfg):
    stacked = np.asarray(block[mod][name]["kernel"], np.float32)
    for layer in range(cfg.n_layer):
      out[f"transformer.h.{layer}.{mod}.{name}.weight"] = stacked[layer].T.copy()
  return out


def load_reference_npz(path: str, cfg: ModelConfig) -> dict:
  with np.load(path) as f:
    return from_reference(dict(f), cfg)


def save_reference_npz(path: str, params, cfg: ModelConfig) -> None:
  np.savez(path, **to_reference(params, cfg))
