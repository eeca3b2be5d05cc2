"""A prefix-keyed cache of model states, shared by the neural backends (``hf.py``,
``small.py``).

Every entry is keyed by a whole token context (a tuple of ids) and holds what the model
needs to continue it: the KV cache of a transformer (all layers, for all its tokens) or
the hidden state of a recurrent net, and the next-token log-probabilities of that
context. ``next_logprobs`` looks up, for each context, the *longest* cached prefix (the
context itself: no forward pass at all; the same particle one token earlier; the prompt,
for a particle resampled onto a context nobody has computed yet) and feeds only the
tokens after it.

Sharing: identical contexts in one call (copies made by resampling) are computed once,
and every context that extends a cached one starts from that entry, so the prompt is
computed once for the whole population. Entries are whole-context copies (not chains of
segments): gathering a batch then costs one copy per particle, not one per token; the
price is memory: particles that have diverged each hold their own copy of the prompt's
keys/values (identical contexts share one entry). An entry's log-probability row is kept
as (the call's [K, V] block, its row index): the rows of one call share one block.

Eviction (bounded memory): after each call, an entry not used (looked up, or stored) in
the last ``keep_calls`` calls is dropped: in SMC, where every call extends the previous
call's contexts by a token, the cache holds keep_calls + 1 generations of contexts (this
call's, the prefixes they extended, and older ones still within keep_calls). On top of that, the total size is kept under ``max_bytes``
by dropping least recently used entries first; entries touched by the current call are
never dropped, so the bound is max(max_bytes, what one call needs). A caller that asks
for one particle per call (the unbatched baseline) needs ``keep_calls`` of at least the
number of particles, or its entries expire before their particle comes round again.
"""
from __future__ import annotations

import abc
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...semantics.errors import PPLError
from .base import LanguageModel


@dataclass
class CacheStats:
    """Counters since the cache was made (or ``reset_stats``)."""

    calls: int = 0            #: next_logprobs calls
    contexts: int = 0         #: contexts asked for (with repeats)
    unique: int = 0           #: distinct contexts asked for
    hits: int = 0             #: distinct contexts answered from the cache, no forward pass
    prefix_hits: int = 0      #: distinct contexts computed from a cached proper prefix
    misses: int = 0           #: distinct contexts computed from scratch
    fed_tokens: int = 0       #: tokens fed to the model
    forward_passes: int = 0   #: batched forward passes
    evictions: int = 0        #: entries dropped
    peak_bytes: int = 0       #: the largest total size of the entries after a call

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Entry:
    state: Any
    logprobs: Any
    nbytes: int
    last_used: int = 0


class PrefixCache:
    """Entries keyed by context, kept in least-recently-used order (an OrderedDict: a
    lookup or store moves the entry to the end), so eviction only ever looks at the
    front: O(1) per entry, not a scan per call."""

    def __init__(self, max_bytes: int = 1 << 30, keep_calls: int = 2):
        if keep_calls < 1:
            raise ValueError("keep_calls must be at least 1")
        self.max_bytes = max_bytes
        self.keep_calls = keep_calls
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.stats = CacheStats()
        self.call = 0
        self.nbytes = 0
        self._lengths: dict[int, int] = {}  # length -> number of entries of that length
        self._sorted_lengths: list[int] | None = None

    # ------------------------------------------------------------------ calls
    def begin_call(self) -> None:
        self.call += 1
        self.stats.calls += 1

    def end_call(self) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes)
        self.evict()

    # ----------------------------------------------------------------- lookup
    def lookup(self, ctx: tuple) -> tuple[int, Entry | None]:
        """The longest cached prefix of ``ctx`` (possibly ``ctx`` itself): (its length,
        its entry), or (0, None). The entry counts as used in this call."""
        if self._sorted_lengths is None:
            self._sorted_lengths = sorted(self._lengths, reverse=True)
        n = len(ctx)
        for length in self._sorted_lengths:
            if length > n:
                continue
            key = ctx if length == n else ctx[:length]
            e = self.entries.get(key)
            if e is not None:
                e.last_used = self.call
                self.entries.move_to_end(key)
                return length, e
        return 0, None

    def put(self, ctx: tuple, state, logprobs, nbytes: int) -> None:
        old = self.entries.pop(ctx, None)
        if old is not None:
            self.nbytes -= old.nbytes
        else:
            self._lengths[len(ctx)] = self._lengths.get(len(ctx), 0) + 1
            self._sorted_lengths = None
        self.entries[ctx] = Entry(state, logprobs, nbytes, self.call)
        self.nbytes += nbytes

    def _pop_front(self) -> None:
        key, e = self.entries.popitem(last=False)
        self.nbytes -= e.nbytes
        n = len(key)
        self._lengths[n] -= 1
        if self._lengths[n] == 0:
            del self._lengths[n]
            self._sorted_lengths = None
        self.stats.evictions += 1

    def evict(self) -> None:
        """Drop entries unused for ``keep_calls`` calls, then least recently used ones
        while over ``max_bytes`` (never those used in the current call)."""
        oldest_kept = self.call - self.keep_calls + 1
        while self.entries:
            e = next(iter(self.entries.values()))
            if e.last_used < oldest_kept or (self.nbytes > self.max_bytes and e.last_used < self.call):
                self._pop_front()
            else:
                break

    def clear(self) -> None:
        while self.entries:
            self._pop_front()

    def __len__(self) -> int:
        return len(self.entries)


# ---------------------------------------------------------------------------------------

class PrefixCachedLM(LanguageModel):
    """``next_logprobs`` on top of a ``PrefixCache``: deduplicate the contexts, answer
    exact hits from the cache, and compute the rest in ONE batched forward pass
    (``_compute``) from their longest cached prefixes. With ``use_cache=False`` every
    distinct context is computed from scratch (still one batched pass) and nothing is
    stored: the reference the cached answers must equal."""

    use_cache: bool = True
    cache: PrefixCache

    def _init_cache(self, use_cache: bool, max_cache_bytes: int, keep_calls: int) -> None:
        self.use_cache = use_cache
        self.cache = PrefixCache(max_bytes=max_cache_bytes, keep_calls=keep_calls)

    @property
    def cache_stats(self) -> CacheStats:
        return self.cache.stats

    def clear_cache(self) -> None:
        self.cache.clear()

    @abc.abstractmethod
    def _compute(self, items: list[tuple[tuple, int, object]]) -> tuple[list, torch.Tensor, list[int]]:
        """items: (context, length of its cached prefix, that prefix's state or None).
        Returns (the state of each context, their next-token log-probs [K, V], the size
        in bytes of each state and row), computed in one batched pass."""

    def _check_new(self, ctx: tuple, start: int) -> None:
        v = self.vocab_size
        for t in ctx[start:]:
            try:
                ok = 0 <= operator.index(t) < v and not isinstance(t, bool)
            except TypeError:
                ok = False
            if not ok:
                raise PPLError(f"{self.name}: token id {t!r} in a context is not in 0..{v - 1}",
                               hint="contexts are tuples of token ids from this model's encode()")

    @torch.no_grad()
    def next_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        ctxs = [c if type(c) is tuple else tuple(c) for c in contexts]
        cache, st = self.cache, self.cache.stats
        cache.begin_call()
        slot: dict[tuple, int] = {}
        inverse = []
        for c in ctxs:
            i = slot.get(c)
            if i is None:
                i = slot[c] = len(slot)
            inverse.append(i)
        uniq = list(slot)
        st.contexts += len(ctxs)
        st.unique += len(uniq)
        # where each distinct context's row comes from: ("new", j): row j of this call's
        # forward pass; a cache hit: (block, row) stored with its entry
        src: list = [None] * len(uniq)
        todo = []
        hits = 0
        for i, c in enumerate(uniq):
            if self.use_cache:
                n, e = cache.lookup(c)
            else:
                n, e = 0, None
            if e is not None and n == len(c):
                src[i] = e.logprobs
                hits += 1
                continue
            self._check_new(c, n)
            if e is not None:
                st.prefix_hits += 1
            else:
                st.misses += 1
            st.fed_tokens += len(c) - n
            src[i] = len(todo)
            todo.append((c, n, None if e is None else e.state))
        st.hits += hits
        lps = None
        if todo:
            st.forward_passes += 1
            states, lps, sizes = self._compute(todo)
            if self.use_cache:
                for j, (c, _, _) in enumerate(todo):
                    # the row is kept as (block, index): the rows of one call share one block
                    cache.put(c, states[j], (lps, j), sizes[j])
        cache.end_call()
        if not uniq:
            return torch.empty(0, self.vocab_size, device=getattr(self, "device", None))
        if hits:
            hit_rows = torch.stack([b[r] for b, r in (x for x in src if type(x) is tuple)])
            base = hit_rows if lps is None else torch.cat([lps, hit_rows.to(lps.device)])
            k, pos = len(todo), []
            for x in src:
                if type(x) is tuple:
                    pos.append(k)
                    k += 1
                else:
                    pos.append(x)
        else:
            base, pos = lps, None  # every row computed, in order
        if pos is None and len(uniq) == len(ctxs):
            return base.clone()
        index = [pos[i] for i in inverse] if pos is not None else inverse
        return base[torch.tensor(index, device=base.device)]

