"""Eight simulated CPU devices for this directory: tests/conftest.py asks XLA for them when
FLT_DEVICES8=1, before JAX starts (tests/parallel/test_devices8.py runs this directory in
its own process that way; directly: FLT_DEVICES8=1 python3 -m pytest -q
tests/parallel/devices8)."""

import jax

if jax.device_count() != 8:
  raise RuntimeError(
    f"tests/parallel/devices8 needs 8 devices but JAX started with {jax.device_count()}; "
    "run it in a fresh process with FLT_DEVICES8=1 (tests/parallel/test_devices8.py does)"
  )
