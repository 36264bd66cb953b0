"""Shared pieces of the benchmarks: timing, the machine's matmul peak, and result files."""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_seconds(fn, *args, repeats: int = 5, warmup: int = 2) -> float:
  """Best wall time of fn(*args) over `repeats` calls, after `warmup` calls (blocks on the result)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_gflops(size: int = 2048, dtype=jnp.float32) -> float:
  """Achieved GFLOP/s of a jitted size x size matmul: the machine's practical peak, measured now."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  seconds = best_seconds(jax.jit(jnp.matmul), a, b, repeats=10)
  return 2 * size ** 3 / seconds / 1e9


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind} x{jax.device_count()} ({platform.machine()}, {os.cpu_count()} cpus)"


def write_json(name: str, payload: dict) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path


def print_table(rows: list[dict], columns: list[str]) -> None:
  widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
  print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("-|-".join("-" * w for w in widths))
  for row in rows:
    print(" | ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
