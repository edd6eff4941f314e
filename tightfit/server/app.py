"""An OpenAI-compatible HTTP API over the runtime: /v1/models, /v1/completions, /v1/chat/completions, /metrics,
/health.

Requests are continuously batched (runtime/batch.py): up to `parallel` sequences decode together in one worker
thread, the others wait in arrival order (at most `max_queue`, then 503). The event loop only moves tokens from
the worker to the clients, so it keeps answering; a client that disconnects frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import chat_template
from ..errors import TightfitError
from ..runtime.batch import Batcher, Sequence
from ..runtime.generate import Decoder, _eos_ids
from ..runtime.sampling import SamplingParams
from . import structured
from .errors import APIError, error_response
from .ops import BodyLimit, Metrics
from .schema import ChatRequest, CompletionRequest


class Server:
    def __init__(self, engine, tokenizer, model_id: str, *, api_key: str | None = None, ctx: int = 2048,
                 max_tokens_limit: int = 2048, max_queue: int = 64, parallel: int = 4):
        self.engine, self.tok, self.model_id, self.api_key = engine, tokenizer, model_id, api_key
        self.ctx = min(ctx, engine.args.max_ctx)
        self.max_tokens_limit, self.max_queue = max_tokens_limit, max_queue
        self.created = int(time.time())
        self.metrics = Metrics()
        self.batcher = Batcher(engine, parallel, self.ctx, on_batch=self.metrics.batch.set)
        self.metrics.waiting.set_function(lambda: self.batcher.queued)
        self.grammars = structured.Grammars(tokenizer, engine.args.vocab_size, _eos_ids(tokenizer))

    # ---- request -> generation ----
    def check_common(self, req) -> None:
        if req.model != self.model_id:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_id}' "
                                "(GET /v1/models).", param="model", code="model_not_found")
        if req.n != 1:
            raise APIError(400, "n must be 1: this server generates one choice per request.", param="n")

    def budget(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        if n_prompt == 0:
            raise APIError(400, "The prompt is empty: give at least one token.", param="prompt")
        if n_prompt >= self.ctx:
            raise APIError(400, f"The prompt has {n_prompt} tokens but this server's context holds {self.ctx}: "
                                "shorten it.", param="messages" if param != "max_tokens" else "prompt",
                           code="context_length_exceeded")
        room = self.ctx - n_prompt
        if max_tokens is None:
            return min(room, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"{param} is {max_tokens}, above this server's limit of {self.max_tokens_limit}.",
                           param=param)
        if max_tokens > room:
            raise APIError(400, f"The prompt ({n_prompt} tokens) plus {param} ({max_tokens}) exceed this server's "
                                f"context of {self.ctx}: lower {param} to at most {room}.", param=param,
                           code="context_length_exceeded")
        return max_tokens

    def params(self, req) -> SamplingParams:
        bias = []  # values are checked by the schema; keys here, against this model's vocabulary
        for key, value in (req.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.engine.args.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids in [0, {self.engine.args.vocab_size}); got "
                                    f"{key!r}.", param="logit_bias")
            bias.append((int(key), float(value)))
        return SamplingParams(req.temperature, req.top_k, req.top_p, req.min_p, req.repetition_penalty, req.seed,
                              req.presence_penalty, req.frequency_penalty, tuple(bias))

    def constraint(self, req) -> structured.Constraint | None:
        """The grammar a chat request's answer must follow (response_format, or a required / named tool call)."""
        if not isinstance(req, ChatRequest):
            return None
        try:
            structured.check_tools(req.tools)
            tool = structured.tool_schema(req.tools, req.tool_choice, req.parallel_tool_calls)
            fmt = structured.response_schema(req.response_format)
            if tool and fmt:
                raise structured.GrammarError("response_format and a required or named tool_choice both constrain "
                                              "the answer: give one of them.", "response_format")
            spec = tool or fmt
            return None if spec is None else self.grammars.from_schema(*spec)
        except structured.GrammarError as e:
            raise APIError(400, str(e), param=e.param) from None

    @staticmethod
    def tools_in_play(req) -> bool:
        return isinstance(req, ChatRequest) and bool(req.tools) and req.tool_choice != "none"

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise APIError(400, f"'{self.model_id}' has no chat template; use /v1/completions with a plain prompt.")
        messages, kwargs = structured.render_chat(self.tok, req.messages, req.tools if self.tools_in_play(req) else None)
        try:  # bounded: the template is code from the model file
            text = chat_template.render(self.tok, messages, **kwargs)
        except chat_template.ChatTemplateError as e:  # it refused the conversation (roles out of order) or ran long
            raise APIError(400, str(e), param="messages") from None
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            if max(p) >= self.engine.args.vocab_size or min(p) < 0:
                raise APIError(400, f"prompt token ids must be in [0, {self.engine.args.vocab_size}).", param="prompt")
            return list(p)
        if isinstance(p, list):
            if len(p) != 1:
                raise APIError(400, "prompt must be one string (batched prompts are not supported).", param="prompt")
            p = p[0]
        return self.tok(p)["input_ids"]

    @property
    def waiting(self) -> int:
        return self.batcher.queued

    async def steps(self, request: Request, it, arrived: float):
        """The steps of one sequence as the batcher makes them; stop it when the client goes away."""
        seq, q = it
        m, last = self.metrics, None
        try:
            while True:
                step = await q.get()
                if step is None:
                    return
                if isinstance(step, Exception):
                    raise step
                now = time.perf_counter()
                m.generated.inc()
                m.ttft.observe(now - arrived) if last is None else m.itl.observe(now - last)
                last = now
                yield step
                if await request.is_disconnected():
                    return
        finally:
            m.e2e.observe(time.perf_counter() - arrived)
            self.batcher.cancel(seq)  # frees its slot if it is still running

    async def run(self, request: Request, ids: list[int], req, max_tokens: int, logprobs: int | None, kind: str):
        params, constraint = self.params(req), self.constraint(req)  # a bad field is refused before queueing
        if self.waiting >= self.max_queue:
            raise APIError(503, f"The server is busy: {self.waiting} requests are waiting. Retry later.",
                           type_="server_error", code="server_busy")
        stream_usage = bool(req.stream_options and req.stream_options.include_usage)
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_id}
        arrived = time.perf_counter()
        self.metrics.prompt_tokens.inc(len(ids))
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        dec = Decoder(self.tok, ids, max_tokens, params, req.stops(), req.ignore_eos, logprobs, constraint)
        seq = Sequence(ids, dec, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        self.batcher.submit(seq)
        it = (seq, q)
        tools = req.tools if self.tools_in_play(req) else None
        forced = bool(tools) and req.tool_choice not in (None, "auto")  # the grammar makes the answer a call
        if req.stream:
            async def events():
                try:
                    async for chunk in self.stream_chunks(request, it, arrived, meta, kind, len(ids), stream_usage,
                                                          logprobs, tools, forced):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.batcher.cancel(seq)
            return StreamingResponse(events(), media_type="text/event-stream")
        steps = [s async for s in self.steps(request, it, arrived)]
        return JSONResponse(self.whole(steps, meta, kind, len(ids), logprobs, tools))

    # ---- response bodies ----
    def _token_str(self, token: int) -> str:
        return self.tok.decode([token])

    def _chat_logprobs(self, s) -> dict:
        t = self._token_str(s.token)
        return {"token": t, "logprob": s.logprob, "bytes": list(t.encode()),
                "top_logprobs": [{"token": self._token_str(i), "logprob": lp, "bytes": list(self._token_str(i).encode())}
                                 for i, lp in s.top_logprobs]}

    def _completion_logprobs(self, steps, offset0: int = 0) -> dict:
        tokens = [self._token_str(s.token) for s in steps]
        offsets, o = [], offset0
        for s in steps:
            offsets.append(o)
            o += len(s.text)
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in steps],
                "top_logprobs": [{self._token_str(i): lp for i, lp in s.top_logprobs} for s in steps],
                "text_offset": offsets}

    @staticmethod
    def usage(n_prompt: int, n_out: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    @staticmethod
    def answer(text: str, tools) -> tuple[dict, bool]:
        """The assistant message for a chat answer: tool calls where the model made them, else content."""
        calls = structured.parse_tool_calls(text, tools) if tools else None
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": structured.openai_tool_calls(calls)}, True
        return {"role": "assistant", "content": text}, False

    def whole(self, steps, meta, kind, n_prompt, logprobs, tools=None) -> dict:
        text = "".join(s.text for s in steps)
        finish = steps[-1].finish_reason if steps else "stop"
        if kind == "chat":
            message, called = self.answer(text, tools)
            finish = "tool_calls" if called else finish
            choice = {"index": 0, "message": message, "finish_reason": finish,
                      "logprobs": {"content": [self._chat_logprobs(s) for s in steps]} if logprobs is not None else None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": self._completion_logprobs(steps) if logprobs is not None else None}
            obj = "text_completion"
        return {**meta, "object": obj, "choices": [choice], "usage": self.usage(n_prompt, len(steps))}

    async def stream_chunks(self, request, it, arrived, meta, kind, n_prompt, include_usage, logprobs, tools=None,
                            forced=False):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        n = 0
        if kind == "chat":
            yield {**meta, "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]}
        usage = {"usage": None} if include_usage else {}
        if forced:  # a required or named call: its name and argument text stream as they are generated
            calls = structured.ToolCallStream()
            async for s in self.steps(request, it, arrived):
                n += 1
                deltas = calls.feed(s.text)
                finish = None if s.finish_reason is None else ("tool_calls" if s.finish_reason == "stop" else
                                                               s.finish_reason)
                if deltas or finish:
                    yield {**meta, "object": obj, "choices": [{"index": 0, "delta": {"tool_calls": deltas} if deltas
                                                              else {}, "logprobs": None, "finish_reason": finish}],
                           **usage}
            if include_usage:
                yield {**meta, "object": obj, "choices": [], "usage": self.usage(n_prompt, n)}
            return
        if tools:  # tool_choice auto: whether the answer is a call is known at its end, one delta then
            steps = [s async for s in self.steps(request, it, arrived)]
            message, called = self.answer("".join(s.text for s in steps), tools)
            if called:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
                finish = "tool_calls"
            else:
                delta, finish = {"content": message["content"]}, steps[-1].finish_reason if steps else "stop"
            yield {**meta, "object": obj, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}], **({"usage": None} if include_usage else {})}
            if include_usage:
                yield {**meta, "object": obj, "choices": [], "usage": self.usage(n_prompt, len(steps))}
            return
        offset = 0
        async for s in self.steps(request, it, arrived):
            n += 1
            if kind == "chat":
                delta = {"content": s.text} if s.text else {}
                lp = {"content": [self._chat_logprobs(s)]} if logprobs is not None else None
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": s.finish_reason}
            else:
                lp = self._completion_logprobs([s], offset) if logprobs is not None else None
                offset += len(s.text)
                choice = {"index": 0, "text": s.text, "logprobs": lp, "finish_reason": s.finish_reason}
            yield {**meta, "object": obj, "choices": [choice], **({"usage": None} if include_usage else {})}
        if include_usage:
            yield {**meta, "object": obj, "choices": [], "usage": self.usage(n_prompt, n)}


def create_app(engine, tokenizer, model_id: str, max_body: int = 16 << 20, **limits) -> FastAPI:
    server = Server(engine, tokenizer, model_id, **limits)
    app = FastAPI(title="tightfit", version="1")
    app.state.server = server
    app.add_middleware(BodyLimit, limit=max_body)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if (server.api_key and request.url.path.startswith("/v1")
                and request.headers.get("authorization", "") != f"Bearer {server.api_key}"):
            response = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                      code="invalid_api_key")
        else:
            response = await call_next(request)
        known = request.url.path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
        server.metrics.requests.labels(request.url.path if known else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(TightfitError)
    async def tightfit_error(_, e: TightfitError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                                       ". Send a JSON object.")
        loc = ".".join(str(x) for x in first.get("loc", ())[1:])
        return error_response(400, f"Invalid request: {loc or 'body'}: {first.get('msg', 'invalid')}.", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):
        return error_response(500, f"Internal error: {type(e).__name__}: {e}", type_="server_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": server.created,
                                            "owned_by": "tightfit"}]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        b = server.batcher
        return {"status": "ok", "waiting": b.queued, "active": len(b.active), "parallel": b.parallel,
                "prefix_tokens_reused": b.stats["reused_tokens"]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_common(req)
        ids = server.completion_ids(req)
        max_tokens = server.budget(len(ids), req.max_tokens, "max_tokens")
        return await server.run(request, ids, req, max_tokens, req.logprobs, "text")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        server.check_common(req)
        ids = server.chat_ids(req)
        limit = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = server.budget(len(ids), limit, param)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        return await server.run(request, ids, req, max_tokens, lp, "chat")

    return app
