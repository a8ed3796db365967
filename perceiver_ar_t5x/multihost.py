"""Control decisions every process of a multi-host run takes together.

A preemption notice (SIGTERM) or Ctrl+C reaches the hosts of a pod slice at different
times, often at different steps. If each host acted on its own flag, one would save and
exit while another entered the next step's collective and waited forever. So the loop
asks `StopAgreement.agreed_stop(step)` at the top of every step, and every process gets
the same answer at the same step: stop when *any* process has been signalled.

How (and why this way): a host-side collective of one int per process through the JAX
coordination service (the gRPC key-value store and barrier that `jax.distributed`
already runs; orbax's multi-host barriers use the same client). It never touches the
device, so it does not wait for the running step: the host stays one step ahead (see
trainer._run_steps) and the exchange, about a millisecond or three on loopback, overlaps
the device's work. A device all-reduce of the flag would be queued behind the step just
dispatched and make the host wait for it every step. JAX's own preemption sync point
listens to SIGTERM in C++ only, which the Python SIGINT/SIGTERM handler would replace.
One process (no `jax.distributed`) reads its flag and nothing else.

A process that dies (kill -9, a crashed host) must not leave the others hanging.
`peer_failures_end_the_run` turns the collective error the survivors get (gloo on CPU
fails at once) into a one-line `PeerFailure`. A collective can also just block (TPU ICI,
or a gloo rendezvous with a peer that never comes): `PeerWatchdog` ends the survivors
with one line once a peer's heartbeat has stopped for half of `--heartbeat_timeout_seconds`,
before JAX's own heartbeat timeout aborts them with a C++ crash report.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

# Processes may drift apart by a compile, an eval or a checkpoint write without anything
# being wrong; a dead process is caught much sooner by the heartbeat timeout.
AGREEMENT_TIMEOUT_S = 3600
_KEY = "perceiver_ar_t5x/stop"
_ALIVE = "perceiver_ar_t5x/alive"
_DONE = "done"


class PeerFailure(ConnectionError):
  """Another process of the run died or cannot be reached; this one stops (one line)."""


class StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes the current step, saves and exits."""

  def __init__(self) -> None:
    self.signum: int | None = None

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is None:
      logging.warning("Received %s: finishing the current step, then saving.",
                      signal.Signals(signum).name)
    self.signum = signum


def _coordination_client() -> Any | None:
  """The jax.distributed client (None in a single-process run)."""
  from jax._src import distributed  # no public accessor; orbax reads the same attribute
  return distributed.global_state.client


class StopAgreement:
  """`agreed_stop(step)`: the same answer on every process, from everyone's StopFlag."""

  def __init__(self, flag: StopFlag) -> None:
    self.flag = flag
    self.client = _coordination_client() if jax.process_count() > 1 else None
    self.rounds = 0

  def agreed_stop(self, step: int) -> int | None:
    """The signal to stop for (the lowest-numbered signalled process's), or None.

    Every process must call this at the same steps (the loop calls it before each step).
    """
    if self.client is None:
      return self.flag.signum
    # Keys alternate between two slots: a process writes slot r % 2 again only after
    # the barrier of round r + 1, which every process passes after reading round r.
    slot = f"{_KEY}/{self.rounds % 2}/"
    self.rounds += 1
    me = jax.process_index()
    self.client.key_value_set(f"{slot}{me:06d}", str(self.flag.signum or 0),
                              allow_overwrite=True)
    self.client.wait_at_barrier(_KEY, AGREEMENT_TIMEOUT_S * 1000)
    signals = [int(value) for _, value in sorted(self.client.key_value_dir_get(slot))]
    agreed = next((s for s in signals if s), None)
    if agreed is not None and self.flag.signum is None:
      logging.warning("Another process received %s: stopping at step %d with it.",
                      signal.Signals(agreed).name, step)
    return agreed


@contextlib.contextmanager
def peer_failures_end_the_run() -> Iterator[None]:
  """In a multi-process run, a failed collective or barrier becomes one `PeerFailure` line.

  On the CPU (gloo) and GPU backends a collective whose peer died fails at once; the
  coordination service fails barriers once the dead process misses its heartbeats.
  A single process re-raises unchanged (its runtime errors are its own).
  """
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    raise PeerFailure(f"process {jax.process_index()} of {jax.process_count()} stopped: "
                      f"{_first_line(e)} (another process probably died; see its log)") from None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


class PeerWatchdog:
  """A thread that ends this process when another one of the run stops beating.

  Each process bumps its own counter in the coordination service's key-value store every
  `timeout_s / 10` and reads everyone's; a counter that has not moved for `timeout_s`
  (or a store that no longer answers: process 0 hosts it) calls `on_failure(message)`,
  which must not return (the binaries print one line and exit 1). A thread, because the
  main thread may be blocked inside a collective that never returns. A process that
  exits normally marks itself done first, so the others do not mistake it for dead.
  """

  def __init__(self, *, timeout_s: float, on_failure: Callable[[str], None]) -> None:
    self.client = _coordination_client()
    self.timeout_s, self.on_failure = timeout_s, on_failure
    self.key = f"{_ALIVE}/{jax.process_index():06d}"
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

  def start(self) -> PeerWatchdog:
    self._thread.start()
    atexit.register(self.stop)  # runs before jax.distributed's own shutdown (registered earlier)
    return self

  def stop(self) -> None:
    if self._stopped.is_set():
      return
    self._stopped.set()
    self._thread.join()
    with contextlib.suppress(jax.errors.JaxRuntimeError):  # the service may be gone already
      self.client.key_value_set(self.key, _DONE, allow_overwrite=True)

  def _run(self) -> None:
    now = time.monotonic()
    seen = {f"{_ALIVE}/{i:06d}": ("", now) for i in range(jax.process_count())}
    beat = 0
    while not self._stopped.wait(self.timeout_s / 10):
      beat += 1
      try:
        self.client.key_value_set(self.key, str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(_ALIVE))
      except jax.errors.JaxRuntimeError as e:
        if not self._stopped.is_set():
          self.on_failure(f"lost the coordination service (process 0): {_first_line(e)}")
        return
      now = time.monotonic()
      for key, (last, since) in seen.items():
        value = values.get(key, "")
        if value != last:
          seen[key] = (value, now)
        elif value != _DONE and now - since > self.timeout_s and not self._stopped.is_set():
          self.on_failure(f"process {int(key.rsplit('/', 1)[1])} sent no heartbeat for "
                          f"{self.timeout_s:g} s; it probably died (see its log)")
          return
