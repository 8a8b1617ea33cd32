"""The Gluon forward's barrier protocol (bench/gluon_attention.py), checked on a model, without a GPU.

Gluon has no interpreter, and the first thing a wrong mbarrier phase does on a GPU is hang (or, with a phase two
rounds ahead, let a wgmma read a slot the producer is overwriting). This file replays each partition's barrier
operations, written out line by line from ``_producer``, ``_consumer``, ``_consumer_pingpong``,
``_producer_persistent`` and ``_consumer_persistent`` (keep them in step), under hardware mbarrier semantics
(``wait(parity)`` passes once the phase of that parity has completed; a fresh barrier counts its phase "-1",
parity 1, as completed), with the partitions interleaved at random. It checks that every schedule finishes (no
deadlock) and that every matrix product reads, from issue to retirement, the block the kernel means (no slot is
refilled while a wgmma still reads it). What it cannot check: the arithmetic, the TMA boxes, the layouts.
"""

from __future__ import annotations

import random

import pytest


class MBarrier:
    def __init__(self, count: int):
        self.count = count
        self.pending = count
        self.completed = 0  # phases completed

    def ready(self, parity: int) -> bool:
        return self.completed % 2 != parity

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.completed += 1
            self.pending = self.count


def run(processes: list, rng: random.Random, max_steps: int = 200_000) -> None:
    """Step the generators in random order; each yields ("wait", barrier, parity) or None (a point where the others
    may run). Fails on a deadlock (every live process waits on a phase that never completes)."""
    live = {i: (p, None) for i, p in enumerate(processes)}
    for _ in range(max_steps):
        if not live:
            return
        runnable = [i for i, (_, w) in live.items() if w is None or w[1].ready(w[2])]
        assert runnable, f"deadlock: {[(i, w[0] if w else None) for i, (_, w) in live.items()]}"
        i = rng.choice(runnable)
        gen, _ = live[i]
        try:
            live[i] = (gen, next(gen))
        except StopIteration:
            del live[i]
    raise AssertionError("did not finish")


def wait(bar, parity):
    return ("wait", bar, parity)


class Ring:
    """The shared memory: what each K, V and Q slot holds (a block's identity), and the barriers."""

    def __init__(self, stages: int, consumers: int, q_parts: int = 1):
        self.S = stages
        self.k = [None] * stages
        self.v = [None] * stages
        self.q = [None] * q_parts
        self.q_bar = MBarrier(1)
        self.q_empty = MBarrier(1)
        self.k_full = [MBarrier(1) for _ in range(stages)]
        self.v_full = [MBarrier(1) for _ in range(stages)]
        self.k_empty = [MBarrier(consumers) for _ in range(stages)]
        self.v_empty = [MBarrier(consumers) for _ in range(stages)]
        self.turn = [MBarrier(1), MBarrier(1)]


def producer(r: Ring, tiles: list[int], persistent: bool):
    """_producer (and _producer_persistent's loop around it): tiles[j] key blocks for tile j."""
    base = 0
    for j, n_blocks in enumerate(tiles):
        if persistent:
            yield wait(r.q_empty, (j & 1) ^ 1)
        for part in range(len(r.q)):
            r.q[part] = j
        r.q_bar.arrive()  # the TMA's bytes: one expect for all Q parts
        for i in range(n_blocks):
            s = (base + i) % r.S
            phase = (((base + i) // r.S) & 1) ^ 1
            yield wait(r.k_empty[s], phase)
            r.k[s] = (j, i)
            yield None
            r.k_full[s].arrive()
            yield wait(r.v_empty[s], phase)
            r.v[s] = (j, i)
            yield None
            r.v_full[s].arrive()
        base += n_blocks


def consumer(r: Ring, tiles: list[int], overlap: bool, persistent: bool):
    """_consumer per tile (and _consumer_persistent's loop around it)."""
    base = 0
    S = r.S
    for j, n_blocks in enumerate(tiles):
        yield wait(r.q_bar, j & 1)
        if overlap:
            if n_blocks > 0:
                first = base % S
                yield wait(r.k_full[first], (base // S) & 1)
                assert r.k[first] == (j, 0) and r.q[0] == j  # S issued
                yield None
                assert r.k[first] == (j, 0) and r.q[0] == j  # S retired
                r.k_empty[first].arrive()
            for i in range(n_blocks - 1):
                s = (base + i) % S
                phase = ((base + i) // S) & 1
                nxt = (base + i + 1) % S
                yield wait(r.k_full[nxt], ((base + i + 1) // S) & 1)
                assert r.k[nxt] == (j, i + 1)  # next S issued
                yield None  # softmax
                yield wait(r.v_full[s], phase)
                assert r.v[s] == (j, i)  # P.V issued
                yield None
                assert r.k[nxt] == (j, i + 1) and r.v[s] == (j, i) and r.q[0] == j  # both retired
                r.k_empty[nxt].arrive()
                r.v_empty[s].arrive()
            if n_blocks > 0:
                s = (base + n_blocks - 1) % S
                yield wait(r.v_full[s], ((base + n_blocks - 1) // S) & 1)
                assert r.v[s] == (j, n_blocks - 1)
                yield None
                assert r.v[s] == (j, n_blocks - 1)
                r.v_empty[s].arrive()
        else:
            for i in range(n_blocks):
                s = (base + i) % S
                phase = ((base + i) // S) & 1
                yield wait(r.k_full[s], phase)
                assert r.k[s] == (j, i) and r.q[0] == j
                yield None
                assert r.k[s] == (j, i) and r.q[0] == j
                r.k_empty[s].arrive()
                yield wait(r.v_full[s], phase)
                assert r.v[s] == (j, i)
                yield None
                assert r.v[s] == (j, i)
                r.v_empty[s].arrive()
        if persistent:
            r.q_empty.arrive()  # every S on this Q retired
        yield None  # the store
        base += n_blocks


def consumer_pingpong(r: Ring, wg: int, n_blocks: int):
    """_consumer_pingpong, warpgroup wg (one tile)."""
    S = r.S
    me, them = r.turn[wg], r.turn[1 - wg]
    first_parity = 1 if wg == 0 else 0
    yield wait(r.q_bar, 0)
    if n_blocks > 0:
        yield wait(r.k_full[0], 0)
        yield wait(me, first_parity)
        assert r.k[0] == (0, 0) and r.q[wg] == 0
        them.arrive()
        yield None
        assert r.k[0] == (0, 0)
        r.k_empty[0].arrive()
        for i in range(1, n_blocks):
            s, prev = i % S, (i - 1) % S
            yield wait(r.k_full[s], (i // S) & 1)
            yield wait(r.v_full[prev], ((i - 1) // S) & 1)
            yield wait(me, (i & 1) ^ first_parity)
            assert r.k[s] == (0, i) and r.v[prev] == (0, i - 1)
            them.arrive()
            yield None
            assert r.k[s] == (0, i) and r.v[prev] == (0, i - 1) and r.q[wg] == 0
            r.k_empty[s].arrive()
            r.v_empty[prev].arrive()
        last = (n_blocks - 1) % S
        yield wait(r.v_full[last], ((n_blocks - 1) // S) & 1)
        yield wait(me, (n_blocks & 1) ^ first_parity)
        assert r.v[last] == (0, n_blocks - 1)
        them.arrive()
        yield None
        assert r.v[last] == (0, n_blocks - 1)
        r.v_empty[last].arrive()


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("n_blocks", [0, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_one_tile_protocol(stages, n_blocks, overlap):
    for seed in range(30):
        r = Ring(stages, consumers=1)
        run([producer(r, [n_blocks], False), consumer(r, [n_blocks], overlap, False)], random.Random(seed))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("n_blocks", [0, 1, 2, 3, 5, 8])
def test_pingpong_protocol(stages, n_blocks):
    for seed in range(30):
        r = Ring(stages, consumers=2, q_parts=2)
        procs = [producer(r, [n_blocks], False), consumer_pingpong(r, 0, n_blocks), consumer_pingpong(r, 1, n_blocks)]
        run(procs, random.Random(seed))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("tiles", [[3, 1, 4, 1, 5], [0, 2, 0, 0, 3], [7, 7, 7], [1], [2, 3, 2, 3, 2, 3, 2]])
def test_persistent_protocol(stages, tiles):
    for seed in range(30):
        r = Ring(stages, consumers=1)
        run([producer(r, tiles, True), consumer(r, tiles, True, True)], random.Random(seed))


def test_the_model_catches_a_wrong_phase():
    """The check can fail: a consumer that waits on the empty barrier's parity (not the full one's) is caught."""

    def wrong_consumer(r, n_blocks):
        yield wait(r.q_bar, 0)
        for i in range(n_blocks):
            s = i % r.S
            yield wait(r.k_full[s], ((i // r.S) & 1) ^ 1)  # the producer's parity, not the consumer's
            assert r.k[s] == (0, i), f"block {i}: slot holds {r.k[s]}"
            r.k_empty[s].arrive()
            yield wait(r.v_full[s], ((i // r.S) & 1) ^ 1)
            r.v_empty[s].arrive()

    with pytest.raises(AssertionError):
        for seed in range(30):
            r = Ring(2, consumers=1)
            run([producer(r, [5], False), wrong_consumer(r, 5)], random.Random(seed))
