"""Joining a multi-process (multi-host) JAX run: the same program on every process, one global mesh over
all their devices (`jax.devices()`), process 0 the one that prints."""

from __future__ import annotations

import jax


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port), or ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address must be HOST:PORT with a port in 1..65535, got {address!r}")
    return host, int(port)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """Join the run of `num_processes` processes whose process 0 serves the coordination service at
    `coordinator` (HOST:PORT, bound on that address only); call before anything else touches JAX's
    devices. CPU devices exchange data through gloo collectives (selected here; ignored by GPU and TPU).
    Waits at most `timeout_s` for every process to join."""
    parse_address(coordinator)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        coordinator_bind_address=coordinator,
        initialization_timeout=timeout_s,
    )


def is_main_process() -> bool:
    """True in process 0 (or without a multi-process run): the process that prints and serves."""
    return jax.process_index() == 0
