"""Operations around the API: Prometheus metrics and the request-body limit."""

from __future__ import annotations

from .errors import APIError


class Metrics:
    """Prometheus metrics of one server (its own registry: several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("tightfit_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("tightfit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated = Counter("tightfit_generation_tokens", "tokens generated", registry=r)
        self.waiting = Gauge("tightfit_queue_depth", "requests waiting for the model", registry=r)
        self.batch = Gauge("tightfit_batch_size", "sequences in the running decode step", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("tightfit_time_to_first_token_seconds", "arrival to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("tightfit_inter_token_latency_seconds", "time between tokens of one request",
                             buckets=buckets, registry=r)
        self.e2e = Histogram("tightfit_request_duration_seconds", "arrival to last token", buckets=buckets, registry=r)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) as soon as its Content-Length or its
    bytes so far say so, before it is read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server's limit of {self.limit} bytes.",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self.too_large().response()(scope, receive, send)
        seen, refused = 0, False

        async def limited():  # past the limit: answer 413 now, and tell the app the client went away
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self.too_large().response()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # the app's own answer to a refused body is dropped
                await send(message)

        return await self.app(scope, limited, guarded_send)
