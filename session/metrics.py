"""Optional Prometheus metrics and OpenTelemetry spans for a SessionStore.

`instrument(store)` wraps the store's public methods on that one instance
(a store never instrumented runs exactly the code it always did):

* with `prometheus-client` installed (`pip install 'docstore-session[metrics]'`),
  a histogram of each call's latency by operation and outcome, and the
  store's counters read from `stats()` at scrape time;
* with `opentelemetry-api` installed, a span around each public call (a no-op
  until the application configures an OpenTelemetry SDK).

Metric names (docs/session.md lists them too):

* `session_store_operation_seconds{operation, outcome}`: histogram of the
  latency of each public call;
* `session_store_<counter>_total`: each counter of `SessionStore.stats()`
  (hits, misses, cache_errors, cache_skipped, decode_errors, fills,
  fills_refused, lease_waits, lease_timeouts, message_hits, message_misses,
  cache_fences);
* `session_store_invalidations_pending` and `session_store_breaker_open`:
  gauges (sessions whose stale copy awaits removal; 1 while the circuit
  breaker keeps Redis out).

`outcome` is `hit` or `miss` for `get_session` and `get_messages` (answered
by Redis or by PostgreSQL), `write` for the other calls that change
something, `read` for `list_sessions`, and `error` when the call raised.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from .store import STAT_NAMES, short_hash

__all__ = ["instrument", "OPERATIONS", "METRIC_PREFIX", "serve_metrics"]

METRIC_PREFIX = "session_store"


class Observable(Protocol):
    """A SessionStore or an AsyncSessionStore: counters and a way to watch them move."""

    def stats(self) -> dict[str, int]: ...

    def add_counter_observer(self, observer: Callable[[str, int], None]) -> None: ...


StoreT = TypeVar("StoreT", bound=Observable)

# Public call -> the outcome it has when it does not raise (None: decided by the counters).
OPERATIONS: dict[str, str | None] = {
    "create_session": "write",
    "get_session": None,
    "update_session": "write",
    "delete_session": "write",
    "touch_session": "write",
    "rotate_session_id": "write",
    "list_sessions": "read",
    "add_message": "write",
    "get_messages": None,
    "pop_message": "write",
    "clear_messages": "write",
    "purge_expired": "write",
}
_OUTCOME_OF_COUNTER = {
    "hits": "hit",
    "misses": "miss",
    "message_hits": "hit",
    "message_misses": "miss",
}
_GAUGES = ("invalidations_pending", "breaker_open")
# Latency buckets in seconds: a Redis hit takes well under a millisecond.
BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _tracer(tracer_provider: Any) -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("session", tracer_provider=tracer_provider)


def instrument(
    store: StoreT,
    *,
    registry: Any = None,
    prometheus: bool = True,
    tracing: bool = True,
    tracer_provider: Any = None,
) -> StoreT:
    """Add metrics and spans to `store` (see the module docstring); return it.

    `store` is a SessionStore, or an AsyncSessionStore (its coroutine methods
    get coroutine wrappers).

    `registry` is the prometheus_client registry (default: the global one);
    one store per registry. `tracer_provider` defaults to OpenTelemetry's
    global one. Call it before the store is shared between threads.
    """
    histogram = _register_prometheus(store, registry) if prometheus else None
    tracer = _tracer(tracer_provider) if tracing else None
    if histogram is None and tracer is None:
        return store
    # A context variable, not a thread-local: it follows each thread and each
    # asyncio task, so concurrent calls never see each other's outcome.
    outcome: contextvars.ContextVar[str | None] = contextvars.ContextVar(
        f"session_outcome_{id(store)}", default=None
    )

    def observe(name: str, amount: int) -> None:
        found = _OUTCOME_OF_COUNTER.get(name)
        if found is not None:
            outcome.set(found)

    store.add_counter_observer(observe)
    for name, fixed_outcome in OPERATIONS.items():
        method = getattr(store, name, None)
        if method is not None:
            wrapped = _wrap(name, method, fixed_outcome, outcome, histogram, tracer)
            setattr(store, name, wrapped)
    return store


def _wrap(
    name: str,
    method: Callable[..., Any],
    fixed_outcome: str | None,
    outcome: contextvars.ContextVar[str | None],
    histogram: Any,
    tracer: Any,
) -> Callable[..., Any]:
    span_name = f"session.{name}"

    def finish(label: str, started: float, span: Any) -> None:
        if histogram is not None:
            histogram.labels(name, label).observe(time.perf_counter() - started)
        if span is not None:
            span.set_attribute("session.outcome", label)

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            outcome.set(None)
            started = time.perf_counter()
            with _span(tracer, span_name, args) as span:
                label = "error"
                try:
                    result = await method(*args, **kwargs)
                    label = fixed_outcome or outcome.get() or "miss"
                finally:
                    finish(label, started, span)
            return result

        return call_async

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        outcome.set(None)
        started = time.perf_counter()
        with _span(tracer, span_name, args) as span:
            label = "error"
            try:
                result = method(*args, **kwargs)
                label = fixed_outcome or outcome.get() or "miss"
            finally:
                finish(label, started, span)
        return result

    return call


class _NoSpan:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _span(tracer: Any, name: str, args: tuple[Any, ...]) -> Any:
    if tracer is None:
        return _NoSpan()
    attributes = {}
    if args and isinstance(args[0], str):
        # Never the id itself: a session id is a bearer credential.
        attributes["session.id_hash"] = short_hash(args[0])
    return tracer.start_as_current_span(name, attributes=attributes)


def _register_prometheus(store: Observable, registry: Any) -> Any:
    try:
        import prometheus_client
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        return None
    if registry is None:
        registry = prometheus_client.REGISTRY

    class StoreCollector:
        """Read the store's counters at scrape time: nothing runs per call for them."""

        def collect(self) -> Iterator[Any]:
            counts = store.stats()
            for stat in STAT_NAMES:
                if stat in _GAUGES:
                    continue
                family = CounterMetricFamily(
                    f"{METRIC_PREFIX}_{stat}", f"SessionStore.stats()['{stat}']"
                )
                family.add_metric([], counts.get(stat, 0))
                yield family
            for stat in _GAUGES:
                gauge = GaugeMetricFamily(
                    f"{METRIC_PREFIX}_{stat}", f"SessionStore.stats()['{stat}']"
                )
                gauge.add_metric([], counts.get(stat, 0))
                yield gauge

    registry.register(StoreCollector())
    return prometheus_client.Histogram(
        f"{METRIC_PREFIX}_operation_seconds",
        "Latency of each public SessionStore call, by operation and outcome",
        ["operation", "outcome"],
        buckets=BUCKETS,
        registry=registry,
    )


def serve_metrics(port: int, *, addr: str = "127.0.0.1", registry: Any = None) -> None:
    """Serve /metrics over HTTP on `addr:port` from a daemon thread (needs prometheus-client)."""
    import prometheus_client

    prometheus_client.start_http_server(
        port, addr=addr, registry=registry or prometheus_client.REGISTRY
    )
