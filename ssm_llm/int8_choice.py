"""Whether int8 products pay on this host: one measurement, recorded on disk, that picks the integer path.

W8A8 (int8 weights, per-token int8 activations, int32 accumulation) beat float32 on every x86 CPU measured
so far, with or without int8 dot-product instructions (`experiments/results/int8_matmul_speed*.json`:
SmolLM2's layer products at two rows 1.4x faster on an AVX2-only EPYC, 1.9x with AVX-512 VNNI), but that is
a property of the CPU and of XLA's CPU backend, not something the flags alone promise (an AVX2 CPU emulates
the integer dot and still wins; a future XLA may change either side). So `converters.load(quantize="auto")`
(`converters.int8_decision`, which keeps GPU / TPU backends float32) and the CLI time both products once
on the host, shaped like a small model's decode step, and keep the result in a JSON record keyed by the
CPU, its flags, the usable cores and the JAX / jaxlib versions: another host or version measures again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import secrets
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.cpu_int8_dot import int8_dot_reference
from ssm_llm.cpu_features import host_cpu

# The integer path is chosen when its products take at most 1/PAYS_AT of float32's time. Whole-model decode
# gains more than the bare products (smaller weights, fewer bytes read): on the AVX2 EPYC products 1.39x faster
# gave W8A8 decode 1.9x and rotated W8A8 1.7x (README, "Quantizing attention models"); the margin covers the
# measurement's noise (about +-5% between runs on the shared 2-core hosts).
PAYS_AT = 1.1
# The measured step: ROWS activation rows (decode pads one row to two: a one-row integer dot takes XLA's slow
# path) against COUNT distinct [K, N] weights: 38 MB in int8 and 151 MB in float32, more than a CPU's last-level
# cache, as a model's weights are. On the 2-core VNNI EPYC (32 MB L3): 1.96-2.13x over three runs, 0.5 s each;
# with 8 weights (12.6 MB of int8, inside the L3) it swung 1.8-2.4x.
ROWS, K, N, COUNT = 2, 768, 2048, 24


@dataclasses.dataclass(frozen=True)
class Int8Choice:
    """One measurement: the host it was taken on and the median time of each product (milliseconds)."""

    cpu: str
    flags: tuple[str, ...]
    jax_version: str  # "jax/jaxlib"
    float32_ms: float
    int8_ms: float
    cores: int = 0  # the cores this process may run on (float32 products use them all)
    machine: str = ""  # platform.machine(): the model name alone is vague on Arm

    @property
    def speedup(self) -> float:
        """float32 time over int8 time."""
        return self.float32_ms / self.int8_ms

    @property
    def pays(self) -> bool:
        """Whether the integer path is the faster one here."""
        return self.speedup >= PAYS_AT

    def matches_host(self) -> bool:
        """Taken on this CPU (model, flags, architecture, usable cores) with this JAX and jaxlib version."""
        return (self.cpu, self.flags, self.jax_version, self.cores, self.machine) == _host_key()


def _host_key() -> tuple:
    cpu = host_cpu()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    versions = f"{jax.__version__}/{jaxlib.__version__}"
    return cpu.model, tuple(sorted(cpu.flags)), versions, cores, platform.machine()


def _products(rows: int, k: int, n: int, count: int):
    """The two jitted steps (float32, W8A8 with per-row activation scales) and their inputs."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
    # separate arrays, as a model's weights are (slices of one stacked array are copied before each dot)
    codes = [rng.integers(-127, 128, (k, n), dtype=np.int8) for _ in range(count)]
    w32 = tuple(jnp.asarray(c, dtype=jnp.float32) for c in codes)
    w8 = tuple(jnp.asarray(c) for c in codes)
    scales = tuple(jnp.asarray(rng.random(n, dtype=np.float32)) for _ in range(count))

    @jax.jit
    def float_step(x, w):
        return sum(x @ w[i] for i in range(count))

    @jax.jit
    def int8_step(x, w, s):
        amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-8)
        q = jnp.round(x * (127.0 / amax)).astype(jnp.int8)

        def dot(i):
            return int8_dot_reference(q, w[i])

        return sum(dot(i).astype(jnp.float32) * (amax / 127.0) * s[i] for i in range(count))

    return (float_step, (x, w32)), (int8_step, (x, w8, scales))


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(repeats: int = 15, *, rows: int = ROWS, k: int = K, n: int = N, count: int = COUNT) -> Int8Choice:
    """Time the float32 and the W8A8 step on this host (about half a second on 2 cores), interleaved in rounds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    (f_fn, f_args), (i_fn, i_args) = _products(rows, k, n, count)
    f_ms, i_ms = [], []
    for _ in range(3):  # interleaved, so a slow spell of a shared host hits both
        f_ms.append(_median_ms(f_fn, f_args, max(repeats // 3, 1)))
        i_ms.append(_median_ms(i_fn, i_args, max(repeats // 3, 1)))
    model, flags, versions, cores, machine = _host_key()
    return Int8Choice(model, flags, versions, statistics.median(f_ms), statistics.median(i_ms), cores, machine)


def read_record(path: Path) -> Int8Choice | None:
    """The measurement recorded at `path`; None when there is none or it is damaged."""
    try:
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(Int8Choice)}
        if not isinstance(data, dict) or not fields <= set(data):  # extra keys: a later version's record
            return None
        choice = Int8Choice(**{**{k: data[k] for k in fields}, "flags": tuple(data["flags"])})
        if not (choice.float32_ms > 0 and choice.int8_ms > 0):
            return None
        return choice
    except (OSError, ValueError, TypeError):
        return None


def write_record(path: Path, choice: Int8Choice) -> None:
    """Record `choice` at `path` (atomic: a temporary file renamed over it; best effort: a record that cannot
    be written only costs a new measurement next time)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dataclasses.asdict(choice), indent=1))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def int8_choice(record: Path) -> Int8Choice:
    """This host's measurement: read from `record` when it was taken here (same CPU, flags and JAX), else
    measured now and written there."""
    choice = read_record(record)
    if choice is None or not choice.matches_host():
        choice = measure()
        write_record(record, choice)
    return choice
