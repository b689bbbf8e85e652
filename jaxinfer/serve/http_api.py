"""OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health and Prometheus /metrics. Errors are OpenAI-style JSON bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from jaxinfer.engine.request_output import RequestOutput
from jaxinfer.serve.frontend import ErrorKind, Frontend, RequestError, Submission, invalid
from jaxinfer.serve.openai_protocol import ChatCompletionRequest, CompletionRequest

HTTP_STATUS = {ErrorKind.INVALID: 400, ErrorKind.NOT_FOUND: 404, ErrorKind.TOO_LARGE: 413, ErrorKind.BUSY: 429,
               ErrorKind.UNAVAILABLE: 503, ErrorKind.DEADLINE: 504, ErrorKind.INTERNAL: 500}
ERROR_TYPE = {ErrorKind.INVALID: "invalid_request_error", ErrorKind.NOT_FOUND: "not_found_error",
              ErrorKind.TOO_LARGE: "invalid_request_error", ErrorKind.BUSY: "rate_limit_error",
              ErrorKind.UNAVAILABLE: "service_unavailable_error", ErrorKind.DEADLINE: "timeout_error",
              ErrorKind.INTERNAL: "internal_error"}
DISCONNECT_POLL_S = 0.25


def error_body(error: RequestError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": ERROR_TYPE[error.kind], "param": None,
                      "code": error.kind.value}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=HTTP_STATUS[error.kind])


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


class HttpApi:
    def __init__(self, frontend: Frontend, max_request_bytes: int, max_prompts: int):
        self.frontend = frontend
        self.max_request_bytes = max_request_bytes
        self.max_prompts = max_prompts
        self.created = int(time.time())
        self.app = FastAPI(title="jaxinfer", version="1", docs_url=None, redoc_url=None)
        app = self.app
        app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))(self.completions)
        app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.exception_handler(RequestError)(_handle_request_error)

    # -- simple endpoints -----------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        self.frontend.require_ready()
        return {"object": "list", "data": [{"id": self.frontend.model_name, "object": "model", "created": self.created,
                                            "owned_by": "jaxinfer", "max_model_len": self.frontend.max_model_len}]}

    async def health(self) -> Response:
        frontend = self.frontend
        if frontend.accepting:
            return JSONResponse({"status": "ok"})
        return error_response(frontend.unavailable())

    async def metrics(self) -> Response:
        return Response(self.frontend.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- generation -----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest, "completions")
        frontend = self.frontend
        try:
            body.check_supported()
            frontend.check_model(body.model)
            prompts = body.prompts()
            if len(prompts) > self.max_prompts:
                raise invalid(f"at most {self.max_prompts} prompts per request, got {len(prompts)}")
            params = body.to_params(frontend.sampling_defaults)
        except RequestError as exc:
            raise frontend.refuse("completions", exc) from None
        submissions = await self._submit_all(prompts, [params] * len(prompts), "completions")
        ident = f"cmpl-{uuid.uuid4().hex}"
        shape = _Completion(ident, frontend, body.logprobs is not None)
        if body.stream:
            return self._sse(submissions, shape, body.include_usage)
        return await self._unless_disconnected(request, self._collect(submissions, shape), submissions)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest, "chat")
        frontend = self.frontend
        try:
            body.check_supported()
            frontend.check_model(body.model)
            prompt = await frontend.encode_chat(body.chat_messages())
            params = body.to_params(frontend.max_model_len - len(prompt), frontend.sampling_defaults)
        except RequestError as exc:
            raise frontend.refuse("chat", exc) from None
        submissions = await self._submit_all([prompt], [params], "chat")
        shape = _Chat(f"chatcmpl-{uuid.uuid4().hex}", frontend, body.logprobs)
        if body.stream:
            return self._sse(submissions, shape, body.include_usage)
        return await self._unless_disconnected(request, self._collect(submissions, shape), submissions)

    async def _parse(self, request: Request, model: type[BaseModel], api: str) -> Any:
        """Read the body within the size limit and validate it (JSON syntax, UTF-8, types)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise self.frontend.refuse(api, self._too_large())
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise self.frontend.refuse(api, self._too_large())
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise self.frontend.refuse(api, invalid(_validation_message(exc))) from None

    def _too_large(self) -> RequestError:
        return RequestError(ErrorKind.TOO_LARGE, f"request body exceeds {self.max_request_bytes} bytes")

    async def _submit_all(self, prompts: list, params: list, api: str) -> list[Submission]:
        """Admit every prompt or none: a refusal aborts the ones already admitted."""
        submissions: list[Submission] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                submissions.append(await self.frontend.submit(prompt, p, api))
        except BaseException:
            for submission in submissions:
                submission.close()
            raise
        return submissions

    async def _collect(self, submissions: list[Submission], shape: _Shape) -> Response:
        finals = await asyncio.gather(*(_final(s) for s in submissions))
        return JSONResponse(shape.full(finals))

    async def _unless_disconnected(self, request: Request, work: Awaitable[Response],
                                   submissions: list[Submission]) -> Response:
        """Run a non-streaming request, aborting it when the client goes away."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        except RequestError as exc:
            return error_response(exc)
        finally:
            if not task.done():
                task.cancel()
            for submission in submissions:
                submission.close()

    def _sse(self, submissions: list[Submission], shape: _Shape, include_usage: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            finals: list[RequestOutput | None] = [None] * len(submissions)
            try:
                for chunk in shape.opening(len(submissions)):
                    yield _event(chunk)
                async for index, output in _merge(submissions):
                    chunk = shape.delta(index, output)
                    if chunk is not None:
                        yield _event(chunk, include_usage)
                    if output.finished:
                        finals[index] = output
                if include_usage:
                    yield _event(shape.usage_chunk(finals))
                yield "data: [DONE]\n\n"
            except RequestError as exc:  # the engine failed mid-stream: the status line is long gone
                yield _event(error_body(exc))
            finally:
                for submission in submissions:
                    submission.close()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _handle_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _event(chunk: dict[str, Any], include_usage: bool = False) -> str:
    if include_usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


async def _final(submission: Submission) -> RequestOutput:
    final = None
    async with contextlib.aclosing(submission.outputs()) as outputs:
        async for output in outputs:
            final = output
    return final


async def _merge(submissions: list[Submission]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's index."""
    if len(submissions) == 1:
        async with contextlib.aclosing(submissions[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, submission: Submission) -> None:
        try:
            async with contextlib.aclosing(submission.outputs()) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
        except RequestError as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(submissions)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, RequestError):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- response shapes ----------------------------------------------------------------------------

class _Shape:
    """Builds one endpoint's JSON: streaming chunks and the full (non-streaming) body."""

    object_name = ""
    chunk_object = ""

    def __init__(self, ident: str, frontend: Frontend, logprobs: bool):
        self.ident = ident
        self.frontend = frontend
        self.logprobs = logprobs
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.ident, "object": object_name, "created": self.created, "model": self.frontend.model_name,
                "choices": choices}

    def _token_text(self, token_id: int) -> str:
        return self.frontend.tokenizer.decode([token_id], skip_special_tokens=False)

    def opening(self, count: int) -> list[dict[str, Any]]:
        return []

    def usage_chunk(self, finals: list[RequestOutput | None]) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = _usage(finals)
        return chunk


def _usage(finals: list[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(f.prompt_ids) for f in finals if f is not None)
    completion = sum(len(f.output_ids) for f in finals if f is not None)
    cached = sum(f.metrics.num_cached_tokens for f in finals if f is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Completion(_Shape):
    object_name = chunk_object = "text_completion"

    def _logprobs(self, output: RequestOutput, entries) -> dict[str, Any] | None:
        if not self.logprobs or entries is None:
            return None
        tokens = [self._token_text(e.token_id) for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top.items()} for e in entries],
                "text_offset": []}

    def delta(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        if not output.new_text and not output.finished and not self.logprobs:
            return None
        entries = output.logprobs[-len(output.new_token_ids):] if output.logprobs and output.new_token_ids else []
        choice = {"index": index, "text": output.new_text, "logprobs": self._logprobs(output, entries),
                  "finish_reason": output.finish_reason}
        return self._envelope(self.chunk_object, [choice])

    def full(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = [{"index": i, "text": f.text, "logprobs": self._logprobs(f, f.logprobs),
                    "finish_reason": f.finish_reason} for i, f in enumerate(finals)]
        body = self._envelope(self.object_name, choices)
        body["usage"] = _usage(finals)
        return body


class _Chat(_Shape):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, entries) -> dict[str, Any] | None:
        if not self.logprobs or entries is None:
            return None
        content = []
        for e in entries:
            text = self._token_text(e.token_id)
            top = [{"token": self._token_text(t), "logprob": lp, "bytes": list(self._token_text(t).encode())}
                   for t, lp in e.top.items()]
            content.append({"token": text, "logprob": e.logprob, "bytes": list(text.encode()), "top_logprobs": top})
        return {"content": content}

    def opening(self, count: int) -> list[dict[str, Any]]:
        return [self._envelope(self.chunk_object, [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]

    def delta(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        if not output.new_text and not output.finished and not self.logprobs:
            return None
        entries = output.logprobs[-len(output.new_token_ids):] if output.logprobs and output.new_token_ids else []
        delta = {"content": output.new_text} if output.new_text else {}
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(entries),
                  "finish_reason": output.finish_reason}
        return self._envelope(self.chunk_object, [choice])

    def full(self, finals: list[RequestOutput]) -> dict[str, Any]:
        final = finals[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                  "logprobs": self._logprobs(final.logprobs), "finish_reason": final.finish_reason}
        body = self._envelope(self.object_name, [choice])
        body["usage"] = _usage(finals)
        return body
