"""The OpenAI Agents SDK session: the SDK's own Runner drives it, with a scripted model.

A fake `Model` (no network) answers each call from a script and records the
input the SDK built for it, so each turn can check that the model saw the
whole conversation. Then the process "restarts" (a new store, an empty
cache) and the conversation goes on. Every backend test runs on a
`SessionStore` and on an `AsyncSessionStore` (`any_backend`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from adapter_backends import Backend
from agents import Agent, RunConfig, Runner, function_tool
from agents.items import ModelResponse, TResponseInputItem, TResponseOutputItem
from agents.memory import Session, SessionSettings
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_reasoning_item import Summary

from session import AsyncSessionStore, InvalidSessionData
from session.contrib import _conversations
from session.contrib.openai_agents import NAMESPACE, OpenAIAgentsSession

RUN_CONFIG = RunConfig(tracing_disabled=True)


@pytest.fixture
def backend(any_backend: Backend) -> Backend:
    """This adapter takes both stores: every backend test runs on each."""
    return any_backend


def message(text: str, *, parts: int = 1, ident: str = "msg") -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=ident,
        type="message",
        role="assistant",
        status="completed",
        content=[
            ResponseOutputText(type="output_text", text=f"{text} ({n})", annotations=[])
            for n in range(1, parts + 1)
        ],
    )


def tool_call(city: str, call_id: str) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=f"fc_{call_id}",
        type="function_call",
        call_id=call_id,
        name="weather",
        arguments=json.dumps({"city": city}),
        status="completed",
    )


def reasoning(text: str, ident: str) -> ResponseReasoningItem:
    return ResponseReasoningItem(
        id=ident, type="reasoning", summary=[Summary(type="summary_text", text=text)]
    )


class ScriptedModel(Model):
    """Answers from a script of responses; records the input of every call."""

    def __init__(self, script: list[list[TResponseOutputItem]]) -> None:
        self.script = list(script)
        self.inputs: list[list[TResponseInputItem]] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        assert isinstance(input, list)
        self.inputs.append(json.loads(json.dumps(input)))
        return ModelResponse(output=self.script.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the tests do not stream")


@function_tool
def weather(city: str) -> str:
    """Return the weather in a city."""
    return f"sunny in {city}"


def user(text: str) -> dict[str, Any]:
    return {"content": text, "role": "user"}


async def run_turn(model: ScriptedModel, session: Session, text: str) -> str:
    agent = Agent(name="assistant", instructions="Be brief.", model=model, tools=[weather])
    result = await Runner.run(agent, text, session=session, run_config=RUN_CONFIG)
    return str(result.final_output)


def turn_script(number: int) -> list[list[TResponseOutputItem]]:
    """Odd turns call the tool (reasoning, a call, then a reply); even turns just reply."""
    if number % 2:
        return [
            [
                reasoning(f"look up {number}", f"rs_{number}"),
                tool_call(f"city{number}", f"c{number}"),
            ],
            [message(f"reply {number}", ident=f"msg_{number}")],
        ]
    return [[message(f"reply {number}", parts=2, ident=f"msg_{number}")]]


async def converse(session: OpenAIAgentsSession, first: int, last: int) -> None:
    """Run turns first..last; each model call must see everything said before it."""
    for number in range(first, last + 1):
        before = await session.get_items()
        model = ScriptedModel(turn_script(number))
        answer = await run_turn(model, session, f"turn {number}")
        assert answer.startswith(f"reply {number}")
        # The turn's first call saw the whole history, then the new input.
        assert model.inputs[0] == before + [user(f"turn {number}")]
        after = await session.get_items()
        # Each later call saw everything the previous call saw plus what happened since.
        for earlier, later in zip(model.inputs, model.inputs[1:], strict=False):
            assert later[: len(earlier)] == earlier
        assert after[: len(model.inputs[-1])] == model.inputs[-1]
        new = after[len(before) :]
        assert new[0] == user(f"turn {number}")
        assert new[-1]["type"] == "message" and new[-1]["role"] == "assistant"
        if number % 2:
            kinds = [item.get("type") for item in new[1:]]
            assert kinds == ["reasoning", "function_call", "function_call_output", "message"]
            assert new[3]["output"] == f"sunny in city{number}"


def test_runner_sees_the_whole_history_across_a_restart(backend: Backend) -> None:
    store = backend.store()
    session = OpenAIAgentsSession("chat-1", store)
    assert isinstance(session, Session)  # the SDK's runtime-checkable protocol
    backend.run(converse(session, 1, 3))
    history = backend.run(session.get_items())
    assert len(history) == 5 + 2 + 5

    restarted = backend.restart()  # a new process: nothing cached
    again = OpenAIAgentsSession("chat-1", restarted)
    assert backend.run(again.get_items()) == history
    backend.run(converse(again, 4, 5))
    assert restarted.stats()["message_hits"] >= 1
    # Another conversation key is another conversation.
    assert backend.run(OpenAIAgentsSession("chat-2", restarted).get_items()) == []


ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "hi ✓ 🎉"},
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "part"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
        ],
    },
    {
        "type": "message",
        "role": "assistant",
        "id": "m1",
        "status": "completed",
        "content": [
            {
                "type": "output_text",
                "text": "a",
                "annotations": [
                    {
                        "type": "url_citation",
                        "url": "https://example.com",
                        "title": "t",
                        "start_index": 0,
                        "end_index": 1,
                    }
                ],
            },
            {"type": "refusal", "refusal": "no"},
        ],
    },
    {
        "type": "function_call",
        "id": "fc",
        "call_id": "c1",
        "name": "f",
        "arguments": '{"x": [1, 2.5, null]}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "c1", "output": '{"ok": true}'},
    {
        "type": "reasoning",
        "id": "rs",
        "summary": [{"type": "summary_text", "text": "think"}],
        "encrypted_content": "opaque==",
    },
    {
        "type": "custom",
        "numbers": [0, -1, 2**63 - 1, 2**70, 1.5, 1e-300, 2.0],
        "nul": "a\u0000b",
        "nested": {"deep": {"deeper": [{}]}},
        "empty": "",
        "none": None,
        "bool": False,
    },
]


def test_every_item_round_trips_exactly(backend: Backend) -> None:
    session = OpenAIAgentsSession("round-trip", backend.store())
    expected = json.loads(json.dumps(ITEMS))

    async def scenario() -> None:
        await session.add_items(ITEMS[:3])
        await session.add_items(ITEMS[3:])
        assert await session.get_items() == expected
        for limit in (1, 3, len(ITEMS), 100):
            assert await session.get_items(limit) == expected[-limit:]
        assert await session.get_items(0) == []
        # What comes back is exactly the JSON (big ints stay ints, 2.0 stays a float).
        custom = (await session.get_items(1))[0]
        assert json.dumps(custom) == json.dumps(ITEMS[-1])

    backend.run(scenario())
    fresh = OpenAIAgentsSession("round-trip", backend.restart())  # a new process
    assert backend.run(fresh.get_items()) == expected


def test_pop_and_clear(backend: Backend) -> None:
    session = OpenAIAgentsSession("pop", backend.store())
    store = backend.sync_store()  # the test's own view of the same data

    async def scenario() -> None:
        assert await session.pop_item() is None  # a key never seen: nothing, nothing created
        assert store.list_sessions(f"{NAMESPACE}:pop") == []
        await session.clear_session()
        assert store.list_sessions(f"{NAMESPACE}:pop") == []
        await session.add_items([user("one"), user("two"), user("three")])
        assert await session.pop_item() == user("three")
        assert await session.get_items() == [user("one"), user("two")]
        await session.add_items([user("four")])
        assert await session.get_items(2) == [user("two"), user("four")]
        await session.clear_session()
        assert await session.get_items() == []
        assert await session.pop_item() is None
        await session.add_items([user("five")])
        other = OpenAIAgentsSession("pop", store)  # another object, same conversation
        assert await other.get_items() == [user("five")]

    backend.run(scenario())


def test_concurrent_pops_return_distinct_items(backend: Backend) -> None:
    store = backend.store()

    async def scenario() -> list[Any]:
        writer = OpenAIAgentsSession("pops", store)
        await writer.add_items([user(str(n)) for n in range(20)])
        poppers = [OpenAIAgentsSession("pops", store) for _ in range(4)]

        async def drain(session: OpenAIAgentsSession) -> list[Any]:
            popped = []
            while (item := await session.pop_item()) is not None:
                popped.append(item)
            return popped

        results = await asyncio.gather(*(drain(session) for session in poppers))
        return [item for batch in results for item in batch]

    popped = backend.run(scenario())
    assert sorted(int(item["content"]) for item in popped) == list(range(20))


def test_session_settings_limit(backend: Backend) -> None:
    session = OpenAIAgentsSession(
        "limited", backend.store(), session_settings=SessionSettings(limit=2)
    )

    async def scenario() -> None:
        await session.add_items([user(str(n)) for n in range(5)])
        assert await session.get_items() == [user("3"), user("4")]
        assert await session.get_items(limit=4) == [user(str(n)) for n in range(1, 5)]

    backend.run(scenario())


@pytest.mark.parametrize(
    "bad",
    [
        ["not a dict"],
        [{"x": float("nan")}],
        [{"x": {1, 2}}],
        [{(1, 2): "tuple key"}],
        [{"x": b"bytes"}],
        [{"big": "x" * (_conversations.MAX_ITEM_BYTES + 1)}],
    ],
)
def test_bad_items_write_nothing(backend: Backend, bad: list[Any]) -> None:
    store = backend.store()
    session = OpenAIAgentsSession("bad", store)

    async def scenario() -> None:
        await session.add_items([user("kept")])
        with pytest.raises(InvalidSessionData):
            await session.add_items([user("good"), *bad, user("after")])
        assert await session.get_items() == [user("kept")]

    backend.run(scenario())


def test_messages_that_hold_no_item_are_skipped(backend: Backend) -> None:
    session = OpenAIAgentsSession("foreign", backend.store())
    store = backend.sync_store()  # writes what the adapter did not

    async def scenario() -> None:
        await session.add_items([user("one")])
        [found] = store.list_sessions(f"{NAMESPACE}:foreign")
        store.add_message(found.id, "note", "not json")
        store.add_message(found.id, "note", "[1, 2]")
        await session.add_items([user("two")])
        store.add_message(found.id, "note", "{broken")
        assert await session.get_items() == [user("one"), user("two")]
        assert await session.get_items(2) == [user("one"), user("two")]
        assert await session.pop_item() == user("two")  # the junk after it is dropped
        assert await session.get_items() == [user("one")]

    backend.run(scenario())


def test_bad_keys_and_stores() -> None:
    for key in ("", None, 5):
        with pytest.raises(ValueError):
            OpenAIAgentsSession(key)  # type: ignore[arg-type]


def test_an_expired_conversation_starts_again(backend: Backend) -> None:
    store = backend.store(cached=False, session_ttl=0.5)
    session = OpenAIAgentsSession("short", store)

    async def scenario() -> None:
        await session.add_items([user("old")])
        deadline = asyncio.get_running_loop().time() + 10
        while await session.get_items() != []:
            assert asyncio.get_running_loop().time() < deadline, "the session never expired"
            await asyncio.sleep(0.05)  # polling with a deadline
        await session.add_items([user("new")])  # a new session for the same key
        assert await session.get_items() == [user("new")]

    backend.run(scenario())


def test_calls_do_not_block_the_event_loop(backend: Backend) -> None:
    """While a store call waits, the loop keeps serving other tasks (a thread, or awaited)."""
    store = backend.store()
    session = OpenAIAgentsSession("loop", store)
    entered, release = threading.Event(), threading.Event()
    original: Any = store.get_messages

    def slow_get_messages(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(10)
        return original(*args, **kwargs)

    async def slow_aget_messages(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.001)
        return await original(*args, **kwargs)

    async def scenario() -> None:
        await session.add_items([user("x")])
        slow = slow_aget_messages if backend.is_async else slow_get_messages
        store.get_messages = slow  # type: ignore[method-assign]
        reading = asyncio.create_task(session.get_items())
        while not entered.is_set():
            await asyncio.sleep(0.001)  # the loop runs while the store call waits
        release.set()
        assert await reading == [user("x")]

    backend.run(scenario())


def test_an_async_store_is_awaited_without_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store is the asyncio one, shared, and no call leaves the event loop."""
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    monkeypatch.delenv("REDIS_URL", raising=False)  # an in-process cache, never the shared one
    _conversations.default_async_store.cache_clear()

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a store call went to a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    threads_before = threading.active_count()

    async def scenario() -> None:
        session = OpenAIAgentsSession("default")
        store = session.store
        assert isinstance(store, AsyncSessionStore)
        try:
            assert OpenAIAgentsSession("other").store is store  # one per process
            await session.add_items([user("hi"), user("there")])
            assert await OpenAIAgentsSession("default").get_items() == [user("hi"), user("there")]
            assert await session.pop_item() == user("there")
            await session.clear_session()
            assert await session.get_items() == []
            assert threading.active_count() == threads_before
        finally:
            await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        _conversations.default_async_store.cache_clear()
