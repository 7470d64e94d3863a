"""Which rank stopped: liveness of the ranks of a job, to name the culprit when a collective fails.

When a rank dies, the others learn it from their next collective: gloo fails at once with
"Connection reset by peer", and a rank that hangs (a deadlock, a stopped process) makes them
wait until the process-group timeout (`parallel.timeout_s`). Neither error says which rank it
was. So every rank runs a `Heartbeat`: a daemon thread that bumps its own counter
(`heartbeat/<rank>`) in the job's rendezvous store every `interval_s`, through its own store
client with a short timeout, so that a frozen store can never block it (or the training
thread). `silent_ranks` reads every counter twice a few intervals apart: ranks whose counter
did not move are dead or hung. If the store itself cannot be reached, the process hosting it
(rank 0, or torchrun's agent) is gone.

`lost_peer_error` turns a failed collective into a `LostPeerError` naming those ranks;
`looks_like_lost_peer` recognises such failures among the RuntimeErrors torch raises.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from tuneforge.errors import UserError

# Fragments of the messages torch.distributed raises when a peer is gone or silent (gloo, NCCL, the store)
LOST_PEER_MARKERS = ("gloo/transport", "Connection reset", "Connection closed", "Broken pipe", "Timed out waiting",
                     "timed out", "NCCL", "ProcessGroup", "recvBytes", "sendBytes")


class LostPeerError(UserError):
    """A collective failed because another rank died or stopped responding."""

    code = 4


class Heartbeat:
    """A daemon thread bumping this rank's counter in the store at `host:port` under `prefix`."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, prefix: str, interval_s: float = 1.0):
        self.host, self.port, self.prefix = host, port, prefix
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def store_timeout_s(self) -> float:
        """How long one store call of the heartbeat may block."""
        return max(2.0, 3 * self.interval_s)

    def _client(self):
        import torch.distributed as dist

        timeout = timedelta(seconds=self.store_timeout_s)
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(self.prefix, store)

    def start(self) -> "Heartbeat":
        store = self._client()
        store.add(f"heartbeat/{self.rank}", 1)

        def beat():
            while not self._stop.wait(self.interval_s):
                try:
                    store.add(f"heartbeat/{self.rank}", 1)
                except Exception:  # noqa: BLE001 - the store is gone; the training thread will find out
                    return

        self._thread = threading.Thread(target=beat, name=f"tuneforge-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it (at most one store timeout). A daemon thread still
        inside a store call when the interpreter exits aborts the process ("terminate called
        without an active exception": it cannot take the GIL back), so it must end first."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.store_timeout_s + self.interval_s)

    def silent_ranks(self, wait_s: float | None = None) -> list[int] | None:
        """Ranks (other than this one) whose counter did not move over `wait_s`; None when the
        store cannot be reached."""
        wait_s = 3 * self.interval_s if wait_s is None else wait_s
        try:
            store = self._client()
            before = [self._count(store, r) for r in range(self.world_size)]
            time.sleep(wait_s)
            after = [self._count(store, r) for r in range(self.world_size)]
        except Exception:  # noqa: BLE001 - connection refused / timed out: the store's host is gone
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    @staticmethod
    def _count(store, rank: int) -> int:
        return int(store.add(f"heartbeat/{rank}", 0))


def looks_like_lost_peer(exc: BaseException) -> bool:
    """Is `exc` a collective or store failure (rather than a bug in the step itself)?"""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except ImportError:
        pass
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in LOST_PEER_MARKERS)


def lost_peer_error(exc: BaseException, heartbeat: Heartbeat | None, rank: int, timeout_s: float) -> LostPeerError:
    """The one-line error for this rank after `exc`, naming the silent ranks when they can be told."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = first.split("] ", 1)[-1][:160]  # drop the C++ source location prefix
    silent = heartbeat.silent_ranks() if heartbeat is not None else []
    if silent is None:
        who = "rank 0 (it hosts the rendezvous store) or the launcher is gone"
    elif silent:
        names = ", ".join(str(r) for r in silent)
        who = f"rank{'s' if len(silent) > 1 else ''} {names} stopped responding (died or hung)"
    else:
        who = "a peer rank failed"
    return LostPeerError(f"rank {rank}: lost the process group: {who}; {first}",
                         hint=f"see the log of the rank named; a rank that hangs is detected after "
                              f"parallel.timeout_s ({timeout_s:g}s)")
