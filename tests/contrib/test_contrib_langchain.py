"""The LangChain chat history: RunnableWithMessageHistory drives it around a fake chat model.

A prompt with the history placeholder feeds a fake chat model from
langchain_core; a step in between records what the model was given, so each
turn can check that it saw the whole conversation. Then the process
"restarts" (a new store, an empty cache) and the conversation goes on.
Every backend test runs on a `SessionStore` (sync and async methods) and on
an `AsyncSessionStore` (the async methods; the sync ones refuse).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from adapter_backends import Backend
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    ToolMessage,
    message_to_dict,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from session import AsyncSessionStore, InvalidSessionData, SessionStore
from session.contrib import _conversations
from session.contrib.langchain import NAMESPACE, SessionChatMessageHistory

MESSAGES: list[BaseMessage] = [
    SystemMessage(content="You are terse.", id="s1"),
    HumanMessage(
        content=[{"type": "text", "text": "look ✓"}, {"type": "image_url", "image_url": "x"}],
        additional_kwargs={"lang": "en", "nested": {"n": [1, 2.5, None]}},
        name="alice",
        id="h1",
    ),
    AIMessage(
        content="",
        tool_calls=[{"name": "weather", "args": {"city": "Oslo", "days": 2}, "id": "call_1"}],
        invalid_tool_calls=[
            {"name": "bad", "args": "{oops", "id": "call_2", "error": "not JSON", "type": "x"}
        ],
        additional_kwargs={"refusal": None},
        response_metadata={"model_name": "fake", "finish_reason": "tool_calls"},
        usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        id="a1",
    ),
    ToolMessage(
        content="sunny", tool_call_id="call_1", artifact={"raw": [1]}, status="success", id="t1"
    ),
    FunctionMessage(content="42", name="answer"),
    ChatMessage(content="custom", role="critic"),
    AIMessageChunk(
        content="partial",
        tool_call_chunks=[{"name": "f", "args": '{"a": 1}', "id": "c3", "index": 0}],
    ),
    HumanMessageChunk(content="chunk"),
    AIMessage(content="big ints", additional_kwargs={"n": [2**63 - 1, 2**70, 2.0, -0.5]}),
]


@pytest.fixture
def backend(any_backend: Backend) -> Backend:
    """This adapter takes both stores: every backend test runs on each."""
    return any_backend


def read(backend: Backend, history: SessionChatMessageHistory) -> list[BaseMessage]:
    """The history's messages: `messages` on a sync store, `aget_messages` on an async one."""
    if backend.is_async:
        return backend.run(history.aget_messages())
    return history.messages


def add(backend: Backend, history: SessionChatMessageHistory, messages: list[Any]) -> None:
    if backend.is_async:
        backend.run(history.aadd_messages(messages))
    else:
        history.add_messages(messages)


def test_every_message_type_round_trips(backend: Backend) -> None:
    history = SessionChatMessageHistory("types", backend.store())
    assert isinstance(history, BaseChatMessageHistory)
    add(backend, history, MESSAGES[:4])
    add(backend, history, MESSAGES[4:])
    for found in (read(backend, history), backend.run(history.aget_messages())):
        assert found == MESSAGES
        assert [message_to_dict(m) for m in found] == json.loads(
            json.dumps([message_to_dict(m) for m in MESSAGES])
        )
        assert [type(m) for m in found] == [type(m) for m in MESSAGES]
    restarted = SessionChatMessageHistory("types", backend.restart())
    assert read(backend, restarted) == MESSAGES


class Recorder:
    """Records the messages each model call is given."""

    def __init__(self) -> None:
        self.inputs: list[list[BaseMessage]] = []

    def __call__(self, prompt: PromptValue) -> PromptValue:
        self.inputs.append(prompt.to_messages())
        return prompt


def chain_for(
    store: SessionStore | AsyncSessionStore, recorder: Recorder, replies: list[BaseMessage]
) -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    model = FakeMessagesListChatModel(responses=replies)
    return RunnableWithMessageHistory(
        prompt | RunnableLambda(recorder) | model,  # type: ignore[arg-type]
        lambda session_id: SessionChatMessageHistory(session_id, store),
        input_messages_key="question",
        history_messages_key="history",
    )


def reply(number: int) -> AIMessage:
    if number % 2:
        return AIMessage(
            content=f"reply {number}",
            tool_calls=[{"name": "lookup", "args": {"turn": number}, "id": f"call_{number}"}],
            response_metadata={"turn": number},
        )
    return AIMessage(content=f"reply {number}", additional_kwargs={"turn": number})


def converse(
    backend: Backend, chain: Any, recorder: Recorder, first: int, last: int, *, use_async: bool
) -> None:
    config = {"configurable": {"session_id": "chat-1"}}
    for number in range(first, last + 1):
        question = {"question": f"turn {number}"}
        if use_async or backend.is_async:  # an asyncio store serves `ainvoke` only
            answer = backend.run(chain.ainvoke(question, config=config))
        else:
            answer = chain.invoke(question, config=config)
        assert answer.content == f"reply {number}"
        seen = recorder.inputs[-1]
        # System prompt, then every earlier turn in order, then the new question.
        expected_history: list[BaseMessage] = []
        for earlier in range(1, number):
            expected_history += [HumanMessage(content=f"turn {earlier}"), reply(earlier)]
        assert seen[0] == SystemMessage(content="Be brief.")
        assert [strip_ids(m) for m in seen[1:-1]] == expected_history
        assert seen[-1] == HumanMessage(content=f"turn {number}")


def strip_ids(message: BaseMessage) -> BaseMessage:
    """The fake model gives its replies run ids; compare the rest."""
    return message.model_copy(update={"id": None})


# langchain-core 1.x deprecates RunnableWithMessageHistory (for LangGraph) but ships it,
# and it is how LangChain apps use a BaseChatMessageHistory.
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_runnable_with_history_across_a_restart(backend: Backend) -> None:
    recorder = Recorder()
    chain = chain_for(backend.store(), recorder, [reply(n) for n in range(1, 4)])
    converse(backend, chain, recorder, 1, 3, use_async=False)
    restarted = backend.restart()  # a new process: nothing cached
    chain = chain_for(restarted, recorder, [reply(n) for n in range(4, 7)])
    converse(backend, chain, recorder, 4, 5, use_async=True)
    converse(backend, chain, recorder, 6, 6, use_async=False)
    assert restarted.stats()["message_hits"] >= 1
    stored = read(backend, SessionChatMessageHistory("chat-1", restarted))
    assert len(stored) == 12
    assert stored[1].tool_calls == reply(1).tool_calls  # type: ignore[attr-defined]


def test_clear_and_the_async_methods(backend: Backend) -> None:
    history = SessionChatMessageHistory("clear", backend.store())
    inspect = backend.sync_store()  # the test's own view of the same data
    backend.run(history.aclear())  # a key never seen: nothing to clear, nothing created
    assert read(backend, history) == []
    assert inspect.list_sessions(f"{NAMESPACE}:clear") == []

    async def scenario() -> None:
        await history.aadd_messages([HumanMessage(content="a"), AIMessage(content="b")])
        assert await history.aget_messages() == [HumanMessage(content="a"), AIMessage(content="b")]
        await history.aclear()
        assert await history.aget_messages() == []
        await history.aadd_messages([HumanMessage(content="again")])

    backend.run(scenario())
    again = SessionChatMessageHistory("clear", backend.store())
    assert read(backend, again) == [HumanMessage(content="again")]
    if not backend.is_async:
        history.clear()
        assert history.messages == []
        history.add_user_message("sync")
        assert SessionChatMessageHistory("clear", inspect).messages == [HumanMessage("sync")]


def test_an_async_store_refuses_the_sync_methods(backend: Backend) -> None:
    """With an AsyncSessionStore the sync methods say what to use; nothing is written."""
    if not backend.is_async:
        history = SessionChatMessageHistory("sync-ok", backend.store())
        history.add_messages([HumanMessage(content="a")])  # a SessionStore serves both
        assert history.messages == backend.run(history.aget_messages())
        return
    history = SessionChatMessageHistory("refuse", backend.store())
    for use in (
        lambda: history.messages,
        lambda: history.add_messages([HumanMessage(content="x")]),
        lambda: history.add_user_message("x"),
        history.clear,
    ):
        with pytest.raises(TypeError, match="aget_messages"):
            use()
    assert backend.sync_store().list_sessions(f"{NAMESPACE}:refuse") == []
    assert backend.run(history.aget_messages()) == []


def test_the_default_store_is_the_process_wide_sync_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    monkeypatch.delenv("REDIS_URL", raising=False)  # an in-process cache, never the shared one
    _conversations.default_store.cache_clear()
    try:
        history = SessionChatMessageHistory("default")
        assert isinstance(history.store, SessionStore)
        assert history.store is _conversations.default_store()
        history.add_messages([HumanMessage(content="hi")])
        again = SessionChatMessageHistory("default")
        assert asyncio.run(again.aget_messages()) == [HumanMessage(content="hi")]
    finally:
        _conversations.default_store().close()
        _conversations.default_store.cache_clear()


@pytest.mark.parametrize(
    "bad",
    [
        "not a message",
        {"type": "human", "data": {"content": "a dict, not a message"}},
        HumanMessage(content="x", additional_kwargs={"nan": float("nan")}),
        HumanMessage(content="x", additional_kwargs={"set": {1, 2}}),
        AIMessage(content="x" * (_conversations.MAX_ITEM_BYTES + 1)),
    ],
)
def test_bad_messages_write_nothing(backend: Backend, bad: Any) -> None:
    history = SessionChatMessageHistory("bad", backend.store())
    add(backend, history, [HumanMessage(content="kept")])
    with pytest.raises(InvalidSessionData):
        add(backend, history, [HumanMessage(content="good"), bad, HumanMessage(content="after")])
    with pytest.raises(InvalidSessionData):
        backend.run(history.aadd_messages([HumanMessage(content="good"), bad]))
    assert read(backend, history) == [HumanMessage(content="kept")]


def test_stored_messages_that_are_not_langchain_messages_are_skipped(backend: Backend) -> None:
    history = SessionChatMessageHistory("foreign", backend.store())
    store = backend.sync_store()  # writes what the adapter did not
    add(backend, history, [HumanMessage(content="one")])
    [found] = store.list_sessions(f"{NAMESPACE}:foreign")
    for junk in ("not json", "[1]", '{"type": "nonsense", "data": {}}', '{"no": "type"}'):
        store.add_message(found.id, "note", junk)
    add(backend, history, [AIMessage(content="two")])
    assert read(backend, history) == [HumanMessage(content="one"), AIMessage(content="two")]


def test_bad_keys() -> None:
    for key in ("", None, 5):
        with pytest.raises(ValueError):
            SessionChatMessageHistory(key)  # type: ignore[arg-type]
