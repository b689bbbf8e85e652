"""The serving process's table of Ray-served streams: outputs go out in token order whichever replica
sent them, and a superseded owner (a lost replica still running, a commit that landed after its move
was called off) cannot add, repeat or finish anything past the token where it was superseded."""

import asyncio

import pytest

pytest.importorskip("ray")

from jaxinfer.engine.request_output import RequestMetrics, RequestOutput  # noqa: E402
from jaxinfer.replicas.ray_replica import StreamTable  # noqa: E402
from jaxinfer.sampling_params import SamplingParams  # noqa: E402
from tests.engine.tiny_engine import CharTokenizer  # noqa: E402

METRICS = RequestMetrics(0.0, 0.0, 0.0, None, 0, 0)


def out(tokens, new, finished=False):
    """The output after ``tokens`` output tokens, the last ``new`` of them added by this step."""
    ids = list(range(100, 100 + tokens))
    return RequestOutput("r", [1, 2], ids, "", ids[tokens - new:], "", finished, "length" if finished else None,
                         None, METRICS)


class Owner:
    def abort(self, request_id):
        pass


def run(script):
    """Open request r on replica 0, run ``script(table)``; returns the new token ids the stream got and
    whether it finished."""
    async def main():
        table = StreamTable()
        stream = table.open("r", Owner(), [1, 2], SamplingParams(max_tokens=10), holder=0)
        script(table)
        await asyncio.sleep(0)  # outputs reach the stream's queue through the loop
        got, finished = [], False
        while not stream._queue.empty():
            item = stream._queue.get_nowait()
            got += item.new_token_ids
            finished = item.finished
        return got, finished
    return asyncio.run(main())


def test_out_of_order_outputs_of_a_move_go_out_in_token_order():
    def script(t):
        lease = t.place("r", holder=1, handover=4)  # moved after 4 tokens
        t.deliver(out(6, 2), lease)  # the destination's first output arrives before the source's last
        t.deliver(out(2, 2), 0)
        t.deliver(out(4, 2), 0)
        t.deliver(out(6, 2), lease)  # a repeat
        t.deliver(out(7, 1, finished=True), lease)
    got, finished = run(script)
    assert got == list(range(100, 107)) and finished


def test_a_superseded_owner_cannot_add_or_finish_past_its_handover():
    def script(t):
        t.deliver(out(3, 3), 0)
        lease = t.place("r", holder=1, handover=3)
        t.deliver(out(5, 2), 0)  # the old owner kept going (a commit reply was lost, not the commit)
        t.deliver(out(3, 0, finished=True), 0)  # ... and was aborted there: not the end of the request
        t.deliver(out(5, 2), lease)
    got, finished = run(script)
    assert got == list(range(100, 105)) and not finished


def test_taking_a_request_back_after_a_failed_commit_drops_the_destination_copy():
    def script(t):
        t.deliver(out(3, 3), 0)
        t.place("r", holder=1, handover=3)  # commit sent to replica 1, its reply never came
        back = t.take_back("r", holder=0)  # the source resumes it under a new lease
        assert back == 2 and t.take_back("r", holder=0) == 2  # a second take-back changes nothing
        t.deliver(out(4, 1), 1)  # the destination's copy ran after all: dropped
        t.deliver(out(4, 1), back)
    got, _ = run(script)
    assert got == list(range(100, 104))


def test_a_resume_starts_from_what_the_stream_has_and_drops_what_waited_out_of_order():
    def script(t):
        t.deliver(out(2, 2), 0)
        t.deliver(out(6, 2), 0)  # waits for tokens 2..3, which the lost replica never sent
        moving, lease = t.resume_state("r", CharTokenizer(), holder=2)
        assert moving.seq.output_ids == [100, 101] and lease == 1
        t.deliver(out(4, 2), 0)  # late output of the lost replica: dropped
        t.deliver(out(4, 2), lease)
        t.deliver(out(6, 2, finished=True), lease)
    got, finished = run(script)
    assert got == list(range(100, 106)) and finished


def test_abort_of_a_request_no_replica_runs_ends_its_stream():
    finished = []

    def script(t):
        t.on_finish = finished.append
        t.deliver(out(2, 2), 0)
        t.abort("r")
        assert t.resume_state("r", CharTokenizer(), holder=1) is None  # closed: nothing to resume
    got, done = run(script)
    assert got == [100, 101] and done and finished[0].finish_reason == "abort"
