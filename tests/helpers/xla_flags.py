"""The XLA flags the tests compile with (tests/conftest.py puts them in XLA_FLAGS, which
every process a test starts inherits)."""

from __future__ import annotations

# XLA:CPU's LLVM at -O0 without its expensive passes, and its classic fusion emitters
# instead of the MLIR ones: the same HLO and semantics, compiled in well under half the
# time (compiling is most of what the tests spend; WORKSPACE "Tests and benchmarks" has
# the figures). libtpu's and the CUDA plugin's ahead-of-time compiles ignore them.
FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_llvm_disable_expensive_passes=true",
  "--xla_cpu_use_fusion_emitters=false",
)


def _name(flag: str) -> str:
  return flag.split("=")[0]


def with_fast_compile(xla_flags: str) -> str:
  """An XLA_FLAGS value with the fast-compile flags it does not already set."""
  flags = xla_flags.split()
  names = {_name(f) for f in flags}
  return " ".join(flags + [f for f in FAST_COMPILE if _name(f) not in names])
