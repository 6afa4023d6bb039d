"""The looped model written out in plain jax.numpy (vectorised, float32, no custom
derivatives, no scan, a Python loop over loops and layers), so that jax.grad of it checks
the model's gradients. tests/model/test_looped.py checks it against a float64 numpy
reference written independently."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS32 = float(np.finfo(np.float32).eps)


def rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + _EPS32)


def rope(x, base=10000.0):
  """x [B, T, H, hd]: rotate the two halves as pairs."""
  t, hd = x.shape[1], x.shape[-1]
  freq = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
  ang = np.outer(np.arange(t, dtype=np.float32), freq)
  cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
  a, b = x[..., : hd // 2], x[..., hd // 2 :]
  return jnp.concatenate([a * cos + b * sin, -a * sin + b * cos], axis=-1)


def windows(cfg) -> list[int | None]:
  """Each layer's window (None: full context); the last layer is always full."""
  pat = cfg.window_pattern.upper()
  out = [(cfg.seq_len // 4 if pat[i % len(pat)] == "S" else None) for i in range(cfg.n_layer)]
  out[-1] = None
  return out


def attention(w, q_in, kv_in, cfg, window):
  bsz, t, _ = q_in.shape
  h, hkv = cfg.n_head, cfg.n_kv_head
  hd = cfg.d_model // h
  q = (q_in @ w["c_q"]).reshape(bsz, t, h, hd)
  if cfg.kv_lora_rank:
    latent = rms(kv_in @ w["c_kv_down"])
    k, v = latent @ w["c_k_up"], latent @ w["c_v_up"]
  else:
    k, v = kv_in @ w["c_k"], kv_in @ w["c_v"]
  k, v = k.reshape(bsz, t, hkv, hd), v.reshape(bsz, t, hkv, hd)
  q, k = rms(rope(q)), rms(rope(k))
  k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
  s = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(hd)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = (j <= i) & ((i - j < window) if window else True)
  s = jnp.where(visible, s, -jnp.inf)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("bhij,bjhd->bihd", p, v).reshape(bsz, t, h * hd) @ w["c_proj"]


def loop_states(params, cfg, toks, loops: int, no_gradient_through: int = 0) -> list:
  """h after each of `loops` loops; h after loop `no_gradient_through - 1` is
  stop_gradient'ed (0: every loop carries gradient)."""
  blk = params["blocks"]["layers"]["block"]
  layer_w = lambda mod, l: {n: v["kernel"][l] for n, v in blk[mod].items()}
  layer_windows = windows(cfg)
  x0 = params["wte"]["embedding"][toks]
  h, states = None, []
  for i in range(loops):
    if i == 0 or cfg.variant not in ("LT", "LT_i"):
      x = rms(x0)
    elif cfg.variant == "LT":
      x = h
    else:
      x = rms(x0 + h)
    for l in range(cfg.n_layer):
      if cfg.variant == "FLT_res" and h is not None:
        x = rms(x + h)
      xn = rms(x)
      inject = h is not None and (cfg.variant == "FLT" or (cfg.variant == "LT_ia" and l == 0))
      x = x + attention(layer_w("attn", l), rms(h) if inject else xn, xn, cfg, layer_windows[l])
      m = rms(x) @ layer_w("mlp", l)["c_fc"]
      x = x + jnp.square(jnp.maximum(m, 0.0)) @ layer_w("mlp", l)["c_proj"]
    h = rms(x)
    if i == no_gradient_through - 1:
      h = jax.lax.stop_gradient(h)
    states.append(h)
  return states


def head_logits(params, cfg, h):
  z = (h @ params["lm_head"]["kernel"])[..., : cfg.vocab_size]
  return cfg.softcap * jnp.tanh(z / cfg.softcap)


def reference_logits(params, cfg, toks, loops: int):
  return head_logits(params, cfg, loop_states(params, cfg, toks, loops)[-1])
