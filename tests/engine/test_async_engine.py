"""AsyncEngine: concurrent token streams from one engine thread, cancellation, refusals, failure."""

import asyncio

import pytest

from jaxinfer.engine.async_engine import AsyncEngine, EngineDeadError
from jaxinfer.engine.scheduler import QueueFullError
from jaxinfer.sampling_params import SamplingParams
from tests.engine import tiny_engine

PROMPTS = [[7, 8, 9], list(range(3, 30)), [5, 9, 30, 41], list(range(20, 45))]
PARAMS = [SamplingParams(max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.9, seed=4, max_tokens=8, ignore_eos=True),
          SamplingParams(max_tokens=6, ignore_eos=True, stop=["zz"]),
          SamplingParams(temperature=1.2, top_k=5, seed=9, max_tokens=12, ignore_eos=True)]


@pytest.fixture(scope="module")
def offline():
    return tiny_engine.engine().generate(PROMPTS, PARAMS)


async def _collect(engine, prompt, params):
    outputs = [o async for o in engine.generate(prompt, params)]
    return outputs


def test_concurrent_streams_equal_offline_outputs(offline):
    engine = AsyncEngine(tiny_engine.engine())

    async def main():
        return await asyncio.gather(*(_collect(engine, p, q) for p, q in zip(PROMPTS, PARAMS, strict=False)))

    try:
        streams = asyncio.run(main())
        for outputs, expected in zip(streams, offline, strict=False):
            assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
            assert [t for o in outputs for t in o.new_token_ids] == expected.output_ids
            assert "".join(o.new_text for o in outputs) == expected.text
            assert outputs[-1].finish_reason == expected.finish_reason
        tiny_engine.assert_no_leaks(engine.engine)
    finally:
        engine.shutdown()


def test_leaving_a_stream_early_aborts_and_frees_pages():
    engine = AsyncEngine(tiny_engine.engine())

    async def main():
        stream = await engine.add_request(PROMPTS[1], SamplingParams(max_tokens=40, ignore_eos=True))
        async for output in stream:
            if len(output.output_ids) >= 3:
                break
        for _ in range(100):
            if not engine.engine.has_unfinished:
                return
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
        tiny_engine.assert_no_leaks(engine.engine)
        assert engine.metrics.kv_pages_used == 0
    finally:
        engine.shutdown()


def test_refusals_are_raised_to_the_caller():
    engine = AsyncEngine(tiny_engine.engine(max_num_seqs=1, max_waiting=1))

    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await engine.add_request([], SamplingParams())
        results = await asyncio.gather(
            *(engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS),
            return_exceptions=True)
        refused = [r for r in results if isinstance(r, QueueFullError)]
        accepted = [r for r in results if not isinstance(r, Exception)]
        assert refused and accepted
        for stream in accepted:
            assert [o async for o in stream][-1].finished

    try:
        asyncio.run(main())
        tiny_engine.assert_no_leaks(engine.engine)
    finally:
        engine.shutdown()


def test_a_failing_step_fails_every_request_and_the_engine_refuses_more():
    inner = tiny_engine.engine()

    def broken_step():
        raise RuntimeError("device fell over")

    inner.step = broken_step
    engine = AsyncEngine(inner)

    async def main():
        with pytest.raises(RuntimeError, match="device fell over"):
            await _collect(engine, PROMPTS[0], PARAMS[0])
        with pytest.raises(EngineDeadError):
            await engine.add_request(PROMPTS[0], PARAMS[0])

    try:
        asyncio.run(main())
        assert not engine.alive
    finally:
        engine.shutdown()
