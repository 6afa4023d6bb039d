"""Eight simulated CPU devices for this directory (run by tests/parallel/test_devices8.py
in a separate process, or directly: FLT_DEVICES8=1 pytest tests/parallel/devices8)."""

import os

_COUNT = "--xla_force_host_platform_device_count=8"
if _COUNT not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _COUNT).strip()

import jax  # noqa: E402

if jax.device_count() != 8:
  raise RuntimeError(
    f"tests/parallel/devices8 needs 8 devices but JAX started with {jax.device_count()}; "
    "run it in a fresh process (tests/parallel/test_devices8.py does)"
  )
