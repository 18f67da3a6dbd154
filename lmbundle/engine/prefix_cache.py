"""A prefix cache for hybrid models: snapshots of the whole decode state after a token prefix.

A GDN layer cannot truncate its state to an earlier position the way an attention KV cache can: its
recurrent and conv state after token n says nothing about token n-1. So the cache keeps *snapshots*
(recurrent state, conv state and the KV rows of the prefix) taken at chosen points of a prompt:
every `block` positions, where a chat message starts (so a system prompt that many users share is
prefilled once, whatever its length), at the end of the prompt with its last token's logits (the same
prompt sent again prefills nothing) and at the end of the reply (so a chat's next turn resumes after
its last answer even when other users ran in between).

Entries are keyed by a 128-bit BLAKE2 digest of the token prefix and store the tokens themselves: a
hit is verified against them, so a digest collision can never return another prefix's state. They
are evicted least-recently-used by byte budgets: `device_bytes` on the accelerator, and where there
is one, entries pushed out of it move to host memory (`host_bytes`) before they are dropped. That move
runs on a thread (and CUDA stream) of its own: a 20-40 MB copy into fresh host pages takes tens of
milliseconds, and on the batch loop's thread it would stall every decoding request (H200, 64 clients:
13 s of an 18.5 s run). Until a copy lands the entry serves hits from the device, so the device holds
up to `MAX_SPILLS_IN_FLIGHT` entries past its budget; past that, entries are dropped, not spilled.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'512M', '2G', '1.5GiB', '0', 1024 -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


MAX_SPILLS_IN_FLIGHT = 8
_LOGITS = "logits"  # an entry's tensor that is not the state's (`Entry.logits`)


def _token_bytes(ids) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


@dataclass
class Entry:
    tokens: bytes  # the prefix (int64), compared on every hit
    length: int
    tensors: dict[str, torch.Tensor]
    nbytes: int
    on_device: bool

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The state's tensors after the prefix (`State.prefix`)."""
        return {name: t for name, t in self.tensors.items() if name != _LOGITS}

    @property
    def logits(self) -> torch.Tensor | None:
        """The prefix's last token's logits [V], when its step kept them (a prompt's end): they pick the next
        token, so a request for exactly this prefix has nothing to prefill."""
        return self.tensors.get(_LOGITS)


class _Spills:
    """Entries' tensors copied to host memory in the background, in order; `landed(key, entry, host)` is
    called on the spilling thread with each entry's host copies.

    A copy goes through one staging buffer, page-locked where there is CUDA, made once and reused: the
    device writes it by DMA, then the CPU copies it out into the entry's own (pageable) host tensors. A
    device-to-pageable copy goes through the driver's own staging instead, and with it a server at 32 clients
    serves less than half as many tokens once spills begin (H200: 1,276 against 2,875 tok/s); pinning a
    fresh buffer per spill costs more than the copy."""

    def __init__(self, landed):
        self._landed = landed
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stream = None
        self._staging: torch.Tensor | None = None
        self._idle = threading.Condition()
        self.in_flight = 0

    def submit(self, key: bytes, entry: Entry) -> None:
        tensors = entry.tensors  # kept alive here until copied, whatever happens to the entry meanwhile
        ready = None
        if any(t.is_cuda for t in tensors.values()):  # the copy waits for the work that wrote them
            ready = torch.cuda.Event()
            ready.record()
        with self._idle:
            self.in_flight += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmbundle-spills", daemon=True)
            self._thread.start()
        self._queue.put((key, entry, tensors, ready))

    def wait(self) -> None:
        """Until every submitted copy has landed."""
        with self._idle:
            self._idle.wait_for(lambda: self.in_flight == 0)

    def _run(self) -> None:
        while True:
            key, entry, tensors, ready = self._queue.get()
            try:
                self._landed(key, entry, self._to_host(tensors, ready))
            finally:
                del tensors
                with self._idle:
                    self.in_flight -= 1
                    self._idle.notify_all()

    def _to_host(self, tensors: dict[str, torch.Tensor], ready) -> dict[str, torch.Tensor]:
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        if self._staging is None or self._staging.numel() < sum(sizes.values()):
            self._staging = torch.empty(sum(sizes.values()), dtype=torch.uint8, pin_memory=ready is not None)
        on_device = contextlib.nullcontext()
        if ready is not None:
            if self._stream is None:
                self._stream = torch.cuda.Stream(next(iter(tensors.values())).device)
            on_device = torch.cuda.stream(self._stream)
        with on_device:
            if ready is not None:
                self._stream.wait_event(ready)
            offset = 0
            for name, t in tensors.items():
                self._staging[offset : offset + sizes[name]].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
                offset += sizes[name]
        if ready is not None:
            self._stream.synchronize()
        host, offset = {}, 0
        for name, t in tensors.items():  # out of the staging buffer, which the next spill reuses
            host[name] = self._staging[offset : offset + sizes[name]].clone().view(t.dtype).view(t.shape)
            offset += sizes[name]
        return host


class PrefixCache:
    """Snapshots by token prefix. `block`: a prompt is snapshotted at its multiples; `marker`: the token that
    starts a chat message (a prompt is snapshotted where one starts)."""

    def __init__(self, device_bytes: int, host_bytes: int = 0, device: torch.device | str = "cpu", block: int = 256,
                 marker: int | None = None):
        self.device = torch.device(device)
        self.block = block
        self.marker = marker
        self.device_bytes = device_bytes
        self.spills = self.device.type != "cpu" and host_bytes > 0
        self.host_bytes = host_bytes if self.spills else 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # least recently used first
        self._on_device: OrderedDict[bytes, None] = OrderedDict()  # the device entries' keys, in the same order
        self._lengths: Counter[int] = Counter()  # the prefix lengths held, for the longest-match lookup
        self.used = {"device": 0, "host": 0}  # an entry on its way to the host counts as there
        self._spills = _Spills(self._landed)
        # every key from the start: /metrics reads these from another thread while they change
        self.counts = Counter(dict.fromkeys(("lookups", "hits", "hit_tokens", "inserts", "spilled", "evicted",
                                             "collisions"), 0))

    @staticmethod
    def digest(tokens: bytes) -> bytes:
        return hashlib.blake2b(tokens, digest_size=16).digest()

    @property
    def enabled(self) -> bool:
        return self.device_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"entries": len(self._entries), "device_bytes": self.used["device"], "host_bytes": self.used["host"],
                "device_budget": self.device_bytes, "host_budget": self.host_bytes, **self.counts}

    def _find(self, tokens: bytes) -> Entry | None:
        entry = self._entries.get(self.digest(tokens))
        if entry is None:
            return None
        if entry.tokens != tokens:  # same digest, another prefix
            self.counts["collisions"] += 1
            return None
        return entry

    def contains(self, ids) -> bool:
        return self._find(_token_bytes(ids)) is not None

    def cuts(self, ids: list[int], held: int) -> list[int]:
        """Where a prompt's state is snapshotted past the `held` positions it starts from: block multiples
        and where a chat message starts (a shared system prompt, a turn). Its end is snapshotted too, with
        the logits of its last token."""
        block, marker = self.block, self.marker
        return [p for p in range(held + 1, len(ids)) if p % block == 0 or (marker is not None and ids[p] == marker)]

    def remember(self, ids: list[int], snapshot: Callable[[int], dict[str, torch.Tensor]],
                 logits: torch.Tensor | None = None) -> None:
        """Keep `snapshot(len(ids))` (a state's tensors after `ids`) unless the prefix is held already, with
        the logits of its last token when given."""
        if self.enabled and not self.contains(ids):
            self.insert(ids, snapshot(len(ids)), logits)

    def lookup(self, ids, limit: int, min_length: int = 1) -> tuple[int, Entry | None]:
        """The longest cached prefix of `ids` with min_length <= length <= limit: (length, entry), or (0, None).
        All of `ids` is a hit only with its last token's logits (`Entry.logits`): they pick the next token."""
        if not self.enabled:
            return 0, None
        self.counts["lookups"] += 1
        tokens = _token_bytes(ids)
        width = 8
        for length in sorted((n for n in self._lengths if min_length <= n <= limit), reverse=True):
            entry = self._find(tokens[: length * width])
            if entry is not None and (length < len(ids) or entry.logits is not None):
                key = self.digest(entry.tokens)
                self._entries.move_to_end(key)
                if key in self._on_device:
                    self._on_device.move_to_end(key)
                self.counts["hits"] += 1
                self.counts["hit_tokens"] += length
                return length, entry
        return 0, None

    def insert(self, ids, tensors: dict[str, torch.Tensor], logits: torch.Tensor | None = None) -> bool:
        """Keep `tensors` (the caller's own copies, on the device) as the state after `ids`, and `logits`, its
        last token's (copied here), if given: a later lookup of all of `ids` then has nothing to prefill."""
        if logits is not None:
            tensors = {**tensors, _LOGITS: logits.reshape(-1).clone()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self.enabled or nbytes > max(self.device_bytes, self.host_bytes):
            return False
        tokens = _token_bytes(ids)
        key = self.digest(tokens)
        if (old := self._entries.get(key)) is not None:
            self._drop(key, old)
        on_device = nbytes <= self.device_bytes
        entry = Entry(tokens, len(ids), tensors, nbytes, on_device)
        if not on_device:
            self._spills.submit(key, entry)
        self._entries[key] = entry
        if on_device:
            self._on_device[key] = None
        self._lengths[entry.length] += 1
        self.used["device" if on_device else "host"] += nbytes
        self.counts["inserts"] += 1
        self._fit()
        return True

    def clear(self) -> None:
        for key, entry in list(self._entries.items()):
            self._drop(key, entry)

    def _drop(self, key: bytes, entry: Entry) -> None:
        del self._entries[key]
        self._on_device.pop(key, None)
        self._lengths[entry.length] -= 1
        if not self._lengths[entry.length]:
            del self._lengths[entry.length]
        self.used["device" if entry.on_device else "host"] -= entry.nbytes

    def _landed(self, key: bytes, entry: Entry, host: dict[str, torch.Tensor]) -> None:
        """A spill's host copies (plain pageable memory: pinning fresh memory is slower still, and torch's
        pinned cache never gives it back) replace the device tensors, unless the entry is gone meanwhile.
        No lock: each step is one atomic operation under the GIL, and a dropped entry's update is moot."""
        if self._entries.get(key) is entry:
            entry.tensors = host

    def settle(self) -> None:
        """Wait until every spill has landed on the host."""
        self._spills.wait()

    def _fit(self) -> None:
        """Spill (or drop) least recently used device entries past the device budget, then drop host ones.
        Device entries are walked in their own order: the host ones, older, would be skipped at every insert."""
        while self.used["device"] > self.device_bytes and self._on_device:
            key = next(iter(self._on_device))
            entry = self._entries[key]
            if self.spills and self._spills.in_flight < MAX_SPILLS_IN_FLIGHT:
                self._spills.submit(key, entry)
                entry.on_device = False
                del self._on_device[key]
                self.used["device"] -= entry.nbytes
                self.used["host"] += entry.nbytes
                self.counts["spilled"] += 1
            else:
                self._drop(key, entry)
                self.counts["evicted"] += 1
        over, victims = self.used["host"] - self.host_bytes, []
        for key, entry in self._entries.items():  # the oldest first: host entries are mostly at the front
            if over <= 0:
                break
            if not entry.on_device:
                victims.append((key, entry))
                over -= entry.nbytes
        for key, entry in victims:
            self._drop(key, entry)
            self.counts["evicted"] += 1
