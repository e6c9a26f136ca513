"""Threads that fit the machine's load (issue 17): the advisor on a scripted load, and the
backend applying its choice to llama.cpp and the vision encoder."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

import edge_vlm
from edge_vlm.config import load_settings
from edge_vlm.cpuload import CpuSample, ProcStatLoad, ThreadAdvisor, machine_load


class ScriptedLoad:
    """A fake CPU-counter source: replays scripted samples and records each read.

    Each step gives the cores other processes used since the previous step (``others``),
    this process's own cores (``own``), the seconds elapsed and, optionally, the run queue.
    """

    def __init__(self, n_cpus: int) -> None:
        self.n_cpus = n_cpus
        self.t = 100.0
        self.busy = 1000.0
        self.own = 10.0
        self.queue: list[tuple[float, float, float, int | None]] = []
        self.reads = 0

    def script(self, steps: Iterable[tuple[float, float, float, int | None]]) -> None:
        self.queue.extend(steps)

    def sample(self) -> CpuSample | None:
        self.reads += 1
        others, own, dt, runnable = self.queue.pop(0) if self.queue else (0.0, 0.0, 0.0, 0)
        self.t += dt
        self.busy += (others + own) * dt
        self.own += own * dt
        return CpuSample(self.t, self.busy, self.own, runnable)


def advisor(n_cpus: int, max_threads: int,
            steps: list[tuple[float, float, float, int | None]]) -> ThreadAdvisor:
    load = ScriptedLoad(n_cpus)
    load.script(steps)
    return ThreadAdvisor(max_threads, load, probes=3, sleep=lambda s: None)


# (others, own, seconds since the previous sample, runnable threads of others)
IDLE = (0.0, 0.0, 1.0, 0)


def test_an_idle_machine_gets_every_thread():
    a = advisor(2, 2, [IDLE, IDLE, IDLE, IDLE])
    assert a.threads() == 2
    assert a.last_others == 0.0


def test_one_busy_core_of_two_leaves_one_thread():
    busy = (1.0, 0.0, 1.0, 1)
    a = advisor(2, 2, [busy, busy, busy, busy])
    assert a.threads() == 1
    assert a.last_others == pytest.approx(1.0)


def test_a_busy_loop_that_just_started_is_seen_in_the_run_queue():
    # The last second was quiet, but another process is runnable now.
    a = advisor(2, 2, [IDLE, (0.0, 0.0, 1.0, 1), (0.0, 0.0, 0.003, 1), (0.0, 0.0, 0.003, 1)])
    assert a.threads() == 1


def test_our_own_cpu_time_is_not_load():
    # This process used both cores (its llama.cpp threads): nobody else did.
    mine = (0.0, 2.0, 1.0, 0)
    a = advisor(2, 2, [IDLE, mine, mine, mine])
    assert a.threads() == 2


def test_never_more_than_the_configured_maximum_nor_less_than_one():
    assert advisor(8, 2, [IDLE] * 4).threads() == 2
    swamped = (7.5, 0.0, 1.0, 12)
    assert advisor(8, 8, [swamped] * 4).threads() == 1


def test_the_rounding_leans_towards_fewer_threads():
    light = (0.25, 0.0, 1.0, 0)  # 1.75 cores free: two threads
    assert advisor(2, 2, [light] * 4).threads() == 2
    half = (0.5, 0.0, 1.0, 0)  # 1.5 free: a partner thread would wait half the time
    assert advisor(2, 2, [half] * 4).threads() == 1
    four = (1.6, 0.0, 1.0, 1)  # 8 cores, 1.6 busy: 6.4 free -> 6
    assert advisor(8, 8, [four] * 4).threads() == 6


def test_the_load_is_averaged_over_the_last_second_not_since_the_start():
    # Busy long ago, idle for the last second and a half: all threads again.
    steps = [(2.0, 0.0, 5.0, 0), (0.0, 0.0, 0.5, 0), (0.0, 0.0, 0.5, 0), (0.0, 0.0, 0.5, 0)]
    a = advisor(2, 2, steps)
    a.observe()
    a.observe()
    assert a.threads(probe=False) == 2


def test_a_platform_that_cannot_tell_keeps_the_maximum():
    class Blind:
        n_cpus = 4

        def sample(self) -> CpuSample | None:
            return None

    assert ThreadAdvisor(3, Blind()).threads() == 3
    assert ThreadAdvisor(3, None).threads() == 3
    with pytest.raises(ValueError, match="at least 1"):
        ThreadAdvisor(0, None)


@pytest.mark.skipif(machine_load() is None, reason="no CPU counters on this platform")
def test_the_machine_source_reads_counters_that_only_grow():
    src = machine_load()
    assert src is not None and src.n_cpus >= 1
    a, b = src.sample(), src.sample()
    assert a is not None and b is not None
    assert b.t >= a.t and b.busy_s >= a.busy_s and b.own_s >= a.own_s
    if isinstance(src, ProcStatLoad):
        assert a.runnable_others is not None and a.runnable_others >= 0


def _ask(vlm: edge_vlm.VLM, image: object) -> str:
    reply = vlm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(image)}},
        {"type": "text", "text": "What is this?"}]}], max_tokens=4, temperature=0)
    return str(reply.choices[0].message.content)


def test_the_engine_applies_the_choice_to_llama_cpp_and_the_vision_encoder(
        tiny_paths, images):
    settings = load_settings({"runtime.gpu": "off"})
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, settings=settings) as vlm:
        engine, backend = vlm.engine, vlm.engine.backend
        assert engine.threads is not None  # runtime.threads unset: follows the load
        load = ScriptedLoad(2)
        engine.threads = ThreadAdvisor(2, load, probes=2, sleep=lambda s: None)
        backend.set_threads(2)
        quiet = _ask(vlm, images["red"])
        assert backend.n_threads[0] == 2
        load.script([(1.0, 0.0, 1.0, 1)] * 40)  # another program takes a core
        busy = _ask(vlm, images["red"])
        assert load.reads > 2
        # This libmtmd's layout is known: the vision encoder follows too.
        assert backend.vision_threads_adjustable
        assert backend.n_threads == (1, 1)
        assert busy == quiet  # fewer threads, same answer
        load.queue.clear()
        load.script([IDLE] * 40)  # the other program has finished...
        _ask(vlm, images["blue"])
        assert backend.n_threads == (1, 1)  # ...a moment ago: not yet
        for _ in range(4):  # quiet for four seconds
            engine.threads.observe()
        _ask(vlm, images["blue"])
        assert backend.n_threads == (2, 2)


def test_an_explicit_thread_count_is_kept(tiny_paths):
    with edge_vlm.load(tiny_paths.model, tiny_paths.mmproj, threads=1, gpu="off") as vlm:
        assert vlm.engine.threads is None
        assert vlm.engine.backend.n_threads[0] == 1


def test_fewer_threads_at_once_more_only_after_the_cores_stay_free():
    busy = (1.0, 0.0, 0.5, 1)
    quiet = (0.0, 0.0, 0.5, 0)
    load = ScriptedLoad(2)
    load.script([busy] * 3)
    a = ThreadAdvisor(2, load, probes=1, sleep=lambda s: None)
    a.observe()
    a.observe()
    assert a.threads(probe=False, current=2) == 1  # at once
    load.script([quiet] * 3)
    a.observe()
    # Quiet for a second only: the busy spell is within the last 3 s, stay at one.
    assert a.threads(probe=False, current=1) == 1
    load.script([quiet] * 8)
    for _ in range(7):
        a.observe()
    assert a.threads(probe=False, current=1) == 2  # quiet for 4 s
