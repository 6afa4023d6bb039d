"""tests/parallel/devices8 needs 8 simulated CPU devices, which must be configured before
JAX starts: test_devices8.py runs it in its own pytest process (FLT_DEVICES8=1)."""

import os

if os.environ.get("FLT_DEVICES8") != "1":
  collect_ignore = ["devices8"]
