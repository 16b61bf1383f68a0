"""The server's scheduler without HTTP: the bounded queue, cancellation, draining, and recovery
from a failing step, on the tiny random LLaMA."""

from __future__ import annotations

import asyncio

import pytest
import torch

import attendo
from attendo.generation.loop import Request
from attendo.model import Model
from attendo.server.scheduler import Delta, QueueFull, Scheduler, ShuttingDown

TIMEOUT = 30.0


class FlakyNetwork(torch.nn.Module):
    """The tiny network, failing on the forward calls whose numbers are in `fail_on`."""

    def __init__(self, inner: torch.nn.Module, fail_on: set[int]) -> None:
        super().__init__()
        self.inner, self.config, self.fail_on, self.calls = inner, inner.config, fail_on, 0

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("simulated failure")
        return self.inner(*args, **kwargs)


@pytest.fixture
def model(tiny_llama_dir) -> Model:
    return attendo.load(tiny_llama_dir)


def request(model: Model, prompt: str = "Hello", max_new_tokens: int = 8) -> Request:
    return Request(model.tokenizer.encode(prompt), model.sampling_settings(do_sample=False), max_new_tokens)


def scheduler(model: Model, **kwargs) -> Scheduler:
    s = Scheduler("tiny", model, **{"max_batch": 2, "max_queue": 1, "max_len": 64, **kwargs})
    s.start()
    return s


async def drain(ticket) -> list[Delta]:
    return [d async for d in ticket.deltas()]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def test_a_ticket_gets_the_python_api_output(model):
    s = scheduler(model)
    try:

        async def go():
            ticket = s.submit([request(model), request(model, "Paris", 5)], asyncio.get_running_loop())
            return await drain(ticket)

        deltas = run(go())
        for index, (prompt, n) in enumerate([("Hello", 8), ("Paris", 5)]):
            mine = [d for d in deltas if d.index == index]
            assert "".join(d.text for d in mine) == model.generate(prompt, max_new_tokens=n, do_sample=False).text
            assert [d.finish_reason for d in mine] == [None] * (n - 1) + ["length"]
        assert s.running == 0 and s.waiting == 0
    finally:
        s.stop()


def test_a_steps_deltas_reach_the_event_loop_in_one_wake_up(model):
    """Three tickets of one and two choices decoding together: each step hands all its deltas to
    the event loop with one call_soon_threadsafe, and every stream still gets its own text."""
    s = scheduler(model, max_batch=3)
    calls, steps = [], []
    step = s.batch.step

    def counted_step():
        events = step()
        steps.append(len(events))
        return events

    s.batch.step = counted_step
    try:

        async def go():
            loop = asyncio.get_running_loop()
            wake = loop.call_soon_threadsafe
            loop.call_soon_threadsafe = lambda *args: calls.append(args) or wake(*args)
            tickets = [s.submit(rs, loop) for rs in ([request(model)], [request(model, "Paris", 5)] * 2)]
            return await asyncio.gather(*(drain(t) for t in tickets))

        hello, paris = run(go())
        assert "".join(d.text for d in hello) == model.generate("Hello", max_new_tokens=8, do_sample=False).text
        for index in (0, 1):
            mine = [d.text for d in paris if d.index == index]
            assert "".join(mine) == model.generate("Paris", max_new_tokens=5, do_sample=False).text
        assert len(calls) == sum(1 for events in steps if events) < len(hello) + len(paris)
    finally:
        s.stop()


def test_the_queue_is_bounded(model):
    s = scheduler(model)
    try:

        async def go():
            loop = asyncio.get_running_loop()
            ticket = s.submit([request(model, max_new_tokens=30)] * 3, loop)  # 2 slots + 1 waiting place
            with pytest.raises(QueueFull):
                s.submit([request(model)], loop)
            await drain(ticket)
            return await drain(s.submit([request(model)], loop))  # room again

        assert run(go())[-1].finish_reason == "length"
    finally:
        s.stop()


def test_cancel_frees_the_slots(model):
    s = scheduler(model)
    try:

        async def go():
            loop = asyncio.get_running_loop()
            ticket = s.submit([request(model, max_new_tokens=60)] * 2, loop)
            await ticket.queue.get()  # it is running
            s.cancel(ticket)
            for _ in range(200):
                if s.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert s.running == 0 and not s.batch.decoding and len(s.batch.free_slots) == 2
            return await drain(s.submit([request(model)] * 2, loop))

        assert len(run(go())) == 16
    finally:
        s.stop()


def test_draining_ends_running_sequences_with_length_and_refuses_new_ones(model):
    s = scheduler(model)
    try:

        async def go():
            loop = asyncio.get_running_loop()
            ticket = s.submit([request(model, max_new_tokens=60)], loop)
            await ticket.queue.get()
            s.drain(0)
            with pytest.raises(ShuttingDown):
                s.submit([request(model)], loop)
            return await drain(ticket)

        deltas = run(go())
        assert deltas[-1].finish_reason == "length" and len(deltas) < 60
    finally:
        s.stop()


def test_a_failing_step_fails_its_tickets_and_the_scheduler_carries_on(model):
    flaky = Model(FlakyNetwork(model.network, fail_on={3}), model.tokenizer, model.generation_defaults, model.source)
    s = scheduler(flaky)
    try:

        async def go():
            loop = asyncio.get_running_loop()
            with pytest.raises(RuntimeError, match="simulated"):
                await drain(s.submit([request(model)], loop))
            return await drain(s.submit([request(model)], loop))

        deltas = run(go())
        assert "".join(d.text for d in deltas) == model.generate("Hello", max_new_tokens=8, do_sample=False).text
        assert s.running == 0
    finally:
        s.stop()
