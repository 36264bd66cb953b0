"""Test set-up: eight fake CPU devices, so sharding tests run on any machine.

The eight devices share this machine's cores with a second pytest worker (and the subprocesses of
launcher tests), so a device thread can wait long for the others at a collective; XLA aborts the
process when that wait exceeds its termination timeout (40 s by default), which is raised here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
