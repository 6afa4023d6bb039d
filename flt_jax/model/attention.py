"""Causal (optionally sliding-window) attention behind one function.

The model calls `attend` only; `impl` (config.model.attention_impl) picks the
implementation, every one of which takes the same arguments:

| impl     | what                                             | runs on                   |
|----------|--------------------------------------------------|---------------------------|
| `xla`    | plain XLA (the reference)                        | CPU, GPU, TPU             |
| `pallas` | our flash attention (`flt_jax.kernels`)          | TPU (Mosaic), GPU (Triton), CPU (interpreted: slow, for tests) |
| `splash` | TPU splash attention                             | TPU                       |
| `cudnn`  | cuDNN flash attention                            | GPU                       |
| `auto`   | TPU: splash; GPU: cudnn; CPU: xla. pallas instead of a fused kernel that cannot take the call (see choose_impl) | all |

The platform is the one the program is compiled for: `KernelOptions.platform`, which
`ModelConfig.for_devices` sets from the mesh's devices (so compiling for a GPU or TPU
topology from a CPU host picks what running there would), or the default backend when
unset. Asking for an implementation the platform cannot run raises an error that names
the ones it can; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flt_jax import kernels


def causal_window_mask(q_positions_T, k_positions_S, window_left):
  """[T, S] bool: key visible to query. window_left < 0 means full causal context."""
  delta = q_positions_T[:, None] - k_positions_S[None, :]
  in_window = jnp.where(window_left < 0, True, delta < window_left)
  return (delta >= 0) & in_window


def _heads_major(x_BxTxHxD, n_kv_heads: int):
  """[B, T, H, D] -> [B, Hkv, G, T, D] (G = H // Hkv): the layout of the batched score and
  value matmuls, so each is one plain batched matmul and XLA adds no transposes around
  them (a reshape only when H = 1)."""
  B, T, H, D = x_BxTxHxD.shape
  return x_BxTxHxD.reshape(B, T, n_kv_heads, H // n_kv_heads, D).transpose(0, 2, 3, 1, 4)


def _tokens_major(x_BxHkvxGxTxD):
  """The inverse of _heads_major: [B, Hkv, G, T, D] -> [B, T, H, D]."""
  B, Hkv, G, T, D = x_BxHkvxGxTxD.shape
  return x_BxHkvxGxTxD.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, D)


def _swap_tokens_and_heads(x):
  """Keys and values: [B, S, Hkv, D] <-> [B, Hkv, S, D]."""
  return jnp.swapaxes(x, 1, 2)


def _xla_logits(q_BxHkvxGxTxD, k_BxHkvxSxD, mask_BxTxS):
  """Masked float32 scores [B, Hkv, G, T, S], scaled by 1/sqrt(head_dim)."""
  D = q_BxHkvxGxTxD.shape[-1]
  logits = jnp.einsum(
    "bkgtd,bksd->bkgts", q_BxHkvxGxTxD, k_BxHkvxSxD, preferred_element_type=jnp.float32
  ) / math.sqrt(D)
  return jnp.where(mask_BxTxS[:, None, None], logits, -jnp.inf)


def _xla_probs(logits, row_max, row_sum, dtype):
  # jax.nn.softmax's arithmetic: exp(x - max) / sum, so forward and backward agree.
  return (jnp.exp(logits - row_max) / row_sum).astype(dtype)


def _xla_attend_fwd(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, mask_BxTxS):
  Hkv = k_BxSxHkvxD.shape[2]
  q = _heads_major(q_BxTxHxD, Hkv)
  k, v = _swap_tokens_and_heads(k_BxSxHkvxD), _swap_tokens_and_heads(v_BxSxHkvxD)
  logits = _xla_logits(q, k, mask_BxTxS)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_sum = jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True)
  probs = _xla_probs(logits, row_max, row_sum, v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
  out = _tokens_major(out).astype(q_BxTxHxD.dtype)
  # Kept for the backward pass: the inputs in heads-major layout and the [..., T, 1]
  # softmax statistics; the [T, S] probabilities are recomputed there (one score
  # matmul) instead of being stored per layer and loop.
  return out, (q, k, v, mask_BxTxS, row_max, row_sum)


@jax.custom_vjp
def masked_attention(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, mask_BxTxS):
  """Softmax attention under an explicit [B, T, S] mask (float32 scores, scale
  1/sqrt(head_dim)); the XLA path and cached decoding share it."""
  return _xla_attend_fwd(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, mask_BxTxS)[0]


def _xla_attend_bwd(res, g_BxTxHxD):
  q, k, v, mask, row_max, row_sum = res  # q [B, Hkv, G, T, D]; k, v [B, Hkv, S, D]
  f32 = jnp.float32
  D = q.shape[-1]
  probs = _xla_probs(_xla_logits(q, k, mask), row_max, row_sum, v.dtype)
  g = _heads_major(g_BxTxHxD.astype(v.dtype), k.shape[1])
  dv = jnp.einsum("bkgts,bkgtd->bksd", probs, g, preferred_element_type=f32)
  dp = jnp.einsum("bkgtd,bksd->bkgts", g, v, preferred_element_type=f32)
  p32 = probs.astype(f32)
  ds = p32 * (dp - jnp.sum(p32 * dp, axis=-1, keepdims=True)) / math.sqrt(D)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k, preferred_element_type=f32)
  dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=f32)
  return (
    _tokens_major(dq).astype(q.dtype),
    _swap_tokens_and_heads(dk).astype(k.dtype),
    _swap_tokens_and_heads(dv).astype(v.dtype),
    None,
  )


masked_attention.defvjp(_xla_attend_fwd, _xla_attend_bwd)


def xla_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  options=None,
):
  """Plain XLA attention with GQA, softmax in float32, scale 1/sqrt(head_dim).

  window_left may be a traced int32 scalar (it comes from the scanned layer axis).
  q_offset is the absolute position of the first query (for cached decoding).
  With segment ids, a query sees only keys of its own segment (packed documents).
  `options` (block sizes, windows) only concern kernels; XLA ignores them.
  The gradient (custom VJP) recomputes the probabilities from the saved softmax
  statistics rather than keeping them.
  """
  del options
  T, S = q_BxTxHxD.shape[1], k_BxSxHkvxD.shape[1]
  mask_BxTxS = causal_window_mask(jnp.arange(T) + q_offset, jnp.arange(S), window_left)[None]
  if q_segment_ids_BxT is not None:
    same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    mask_BxTxS = mask_BxTxS & same_BxTxS
  return masked_attention(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, mask_BxTxS)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """Static settings for the kernels (hashable, so jit and scan treat them as constants).

  block_q, block_kv: tile sizes (0 = the kernel's default for the platform).
  windows: every value `window_left` can take. splash and cudnn bake the window into the
  kernel, so with a traced window they build one kernel per value and switch on it.
  platform: the target ("cpu", "gpu", "tpu"; see `platform_of`), "" = the default backend
  when the call is traced.
  """

  block_q: int = 0
  block_kv: int = 0
  windows: tuple[int, ...] = ()
  platform: str = ""


def pallas_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  options=None,
):
  """Our Pallas flash attention: Mosaic on TPU, Triton on GPU, interpreted on CPU."""
  options = options or KernelOptions()
  lowering, interpret = kernels.lowering_for(options.platform or current_platform())
  return kernels.flash_attention(
    q_BxTxHxD,
    k_BxSxHkvxD,
    v_BxSxHkvxD,
    window_left=window_left,
    q_offset=q_offset,
    q_segment_ids_BxT=q_segment_ids_BxT,
    kv_segment_ids_BxS=kv_segment_ids_BxS,
    block_q=options.block_q,
    block_kv=options.block_kv,
    lowering=lowering,
    interpret=interpret,
  )


def splash_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  options=None,
):
  """TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention)."""
  options = options or KernelOptions()
  return kernels.splash_attention(
    q_BxTxHxD,
    k_BxSxHkvxD,
    v_BxSxHkvxD,
    window_left=window_left,
    q_offset=q_offset,
    q_segment_ids_BxT=q_segment_ids_BxT,
    kv_segment_ids_BxS=kv_segment_ids_BxS,
    block_q=options.block_q,
    block_kv=options.block_kv,
    windows=options.windows,
  )


def cudnn_attention(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  options=None,
):
  """cuDNN flash attention through jax.nn.dot_product_attention (GPU, bf16/fp16)."""
  options = options or KernelOptions()
  return kernels.cudnn_attention(
    q_BxTxHxD,
    k_BxSxHkvxD,
    v_BxSxHkvxD,
    window_left=window_left,
    q_offset=q_offset,
    q_segment_ids_BxT=q_segment_ids_BxT,
    kv_segment_ids_BxS=kv_segment_ids_BxS,
    windows=options.windows,
  )


_IMPLS = {
  "xla": xla_attention,
  "pallas": pallas_attention,
  "splash": splash_attention,
  "cudnn": cudnn_attention,
}
# Which implementations each platform can run.
PLATFORM_IMPLS = {
  "cpu": ("xla", "pallas"),
  "gpu": ("xla", "pallas", "cudnn"),
  "tpu": ("xla", "pallas", "splash"),
}
# What `auto` picks: the platform's fused kernel where one exists. The TPU and GPU picks
# are the vendors' tuned kernels; benchmarks/attention_bench.py compares them with pallas.
AUTO_IMPL = {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}
# What each implementation is, for the run's first line and the AOT report.
IMPL_NAMES = {
  "xla": "plain XLA",
  "pallas": "our Pallas flash attention",
  "splash": "TPU splash attention",
  "cudnn": "cuDNN flash attention",
}


def platform_name(platform: str) -> str:
  """A JAX platform name with CUDA and ROCm both called "gpu"."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def platform_of(devices) -> str:
  """The one platform of `devices` (a program is compiled for one kind of device)."""
  platforms = {platform_name(d.platform) for d in devices}
  if len(platforms) != 1:
    raise ValueError(f"the devices mix platforms {sorted(platforms)}; give devices of one kind")
  return platforms.pop()


def current_platform() -> str:
  """The default backend's platform (jax.default_backend(), "gpu" for CUDA and ROCm)."""
  return platform_name(jax.default_backend())


def register(name: str, fn, platforms=("cpu", "gpu", "tpu")) -> None:
  """Adds an implementation taking `attend`'s arguments (add `name` to ATTENTION_IMPLS too)."""
  _IMPLS[name] = fn
  for platform in platforms:
    if name not in PLATFORM_IMPLS.setdefault(platform, ()):
      PLATFORM_IMPLS[platform] += (name,)


def choose_impl(
  impl: str,
  platform: str = "",
  *,
  has_segments: bool = False,
  has_offset: bool = False,
  float32: bool = False,
  windows_known: bool = True,
) -> tuple[str, str]:
  """(implementation, why) for `impl` on `platform` ("" = the default backend).

  `auto` takes the platform's fused kernel unless the call needs what it lacks, then
  pallas: cuDNN (via jax.nn) has no segment ids or float32; both fused kernels need
  queries starting at 0 and the window's possible values at trace time. Raises
  ValueError for an implementation the platform cannot run.
  """
  platform = platform_name(platform or current_platform())
  available = PLATFORM_IMPLS.get(platform, ("xla",))
  if impl == "auto":
    fused = AUTO_IMPL.get(platform, "xla")
    lacks = []
    if fused == "cudnn" and has_segments:
      lacks.append("segment ids (separate_documents)")
    if fused == "cudnn" and float32:
      lacks.append("float32 (cuDNN needs bfloat16)")
    if fused in ("cudnn", "splash") and has_offset:
      lacks.append("a query offset")
    if fused in ("cudnn", "splash") and not windows_known:
      lacks.append("a traced window without its static set")
    if lacks:
      return "pallas", f"{platform}; {fused} cannot take {', '.join(lacks)}"
    return fused, f"{platform}: {IMPL_NAMES[fused]}"
  if impl not in _IMPLS:
    raise ValueError(
      f"attention_impl={impl!r} is unknown; choose one of {sorted(_IMPLS) + ['auto']}"
    )
  if impl not in available:
    raise ValueError(
      f"attention_impl={impl!r} cannot run on this platform ({platform}); available here: "
      f"{', '.join(available)} (or 'auto')"
    )
  return impl, f"{platform}: {IMPL_NAMES.get(impl, impl)}"


def resolve_impl(impl: str, platform: str = "", **call) -> str:
  """The implementation `impl` names on `platform` (see choose_impl)."""
  return choose_impl(impl, platform, **call)[0]


def describe_choice(impl: str, platform: str = "", **call) -> str:
  """One line for a run's start: `attention: auto -> cudnn (gpu: cuDNN flash attention)`."""
  chosen, why = choose_impl(impl, platform, **call)
  return f"attention: {impl}" + (f" -> {chosen}" if chosen != impl else "") + f" ({why})"


# Logical axes of attend's operands (the model's activation names; head_dim has no rule).
_Q_AXES = ("batch", "length", "heads", "head_dim")
_KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def _mesh_axes_size(mesh, axes) -> int:
  names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  return math.prod(mesh.shape[name] for name in names)


def _local_specs(mesh, q, k):
  """PartitionSpecs (q, k/v, segment ids) of each device's shard: batch and heads split
  as the logical rules say where the sizes divide, length and head_dim whole. q's and
  k's heads split alike or not at all, so each shard keeps whole GQA groups."""
  q_axes, kv_axes = nn.logical_to_mesh_axes(_Q_AXES), nn.logical_to_mesh_axes(_KV_AXES)
  batch = q_axes[0] if q.shape[0] % _mesh_axes_size(mesh, q_axes[0]) == 0 else None
  heads, kv_heads = q_axes[2], kv_axes[2]
  if q.shape[2] % _mesh_axes_size(mesh, heads) or k.shape[2] % _mesh_axes_size(mesh, kv_heads):
    heads = kv_heads = None
  return (
    PartitionSpec(batch, None, heads, None),
    PartitionSpec(batch, None, kv_heads, None),
    PartitionSpec(batch, None),
  )


def _per_shard(fn, q, k, v, *, window_left, q_offset, q_segment_ids_BxT, kv_segment_ids_BxS):
  """fn(q, k, v, window_left=, q_offset=, segment ids) on each device's shard.

  A Pallas kernel is an opaque custom call: Mosaic refuses to be partitioned, and XLA
  would gather a Triton call's operands onto every device. So under a mesh (the model
  traced by parallel.sharding's jit, with its logical rules) the kernel runs in
  shard_map over the batch and head axes, where attention needs no communication.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not nn.get_logical_axis_rules():
    return fn(
      q,
      k,
      v,
      window_left=window_left,
      q_offset=q_offset,
      q_segment_ids_BxT=q_segment_ids_BxT,
      kv_segment_ids_BxS=kv_segment_ids_BxS,
    )
  q_spec, kv_spec, seg_spec = _local_specs(mesh, q, k)
  static_window = isinstance(window_left, int)
  has_segments = q_segment_ids_BxT is not None
  operands = [q, k, v]
  specs = [q_spec, kv_spec, kv_spec]
  if not static_window:  # traced (the layer scan's): every shard gets the scalar
    operands.append(jnp.asarray(window_left, jnp.int32))
    specs.append(PartitionSpec())
  if has_segments:
    operands += [q_segment_ids_BxT, kv_segment_ids_BxS]
    specs += [seg_spec, seg_spec]

  def local(q, k, v, *rest):
    rest = list(rest)
    window = window_left if static_window else rest.pop(0)
    q_seg, kv_seg = rest if has_segments else (None, None)
    return fn(
      q,
      k,
      v,
      window_left=window,
      q_offset=q_offset,
      q_segment_ids_BxT=q_seg,
      kv_segment_ids_BxS=kv_seg,
    )

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(
    *operands
  )


def attend(
  q_BxTxHxD,
  k_BxSxHkvxD,
  v_BxSxHkvxD,
  *,
  window_left,
  impl="xla",
  q_offset=0,
  q_segment_ids_BxT=None,
  kv_segment_ids_BxS=None,
  options: KernelOptions | None = None,
):
  """q: [B, T, H, D]; k, v: [B, S, Hkv, D] with Hkv dividing H. Returns [B, T, H, D].

  Every implementation takes these arguments: causal attention, a left window
  (`window_left` > 0, or -1 for full context; may be traced), query positions offset by
  `q_offset`, optional segment ids (int [B, T] and [B, S]; attention stays within equal
  ids), and static kernel `options` (ModelConfig.attention_options).
  """
  has_offset = not (isinstance(q_offset, int) and q_offset == 0)
  options = options or KernelOptions()
  impl = resolve_impl(
    impl,
    options.platform,
    has_segments=q_segment_ids_BxT is not None,
    has_offset=has_offset,
    float32=q_BxTxHxD.dtype == jnp.float32,
    windows_known=isinstance(window_left, int) or bool(options.windows),
  )
  fn = functools.partial(_IMPLS[impl], options=options)
  call = dict(
    window_left=window_left,
    q_offset=q_offset,
    q_segment_ids_BxT=q_segment_ids_BxT,
    kv_segment_ids_BxS=kv_segment_ids_BxS,
  )
  if impl == "xla" or has_offset:  # XLA partitions its own ops; decode steps run unsharded
    return fn(q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, **call)
  return _per_shard(fn, q_BxTxHxD, k_BxSxHkvxD, v_BxSxHkvxD, **call)
