"""The pieces under the store: cache encoding, protocol rules and scripts, circuit breaker."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import fakeredis
import msgpack
import pytest
from contract.session_contract import RICH_DATA, reference_window
from hypothesis import given, settings
from hypothesis import strategies as st

from session import Message, Session
from session.breaker import CircuitBreaker
from session.coherence import (
    FILL_SESSION,
    FILL_SESSION_AND_TAIL,
    FILL_TAIL,
    READ,
    READ_DROPPED,
    READ_SESSION,
    VERSION_OF_LUA,
    WRITE_MESSAGE,
    WRITE_SESSION,
    FillResult,
    MessageWindow,
    ProtocolError,
    SessionRead,
    TailRead,
    cache_px,
    is_contiguous,
    lease_wait_delays,
    parse_fill_pair_reply,
    parse_fill_reply,
    parse_read_reply,
    parse_read_session_reply,
    read_args,
    read_session_args,
    session_keys,
)
from session.models import SessionState, from_micros, to_micros
from session.serializer import (
    FORMAT_VERSION,
    TOMBSTONE,
    DecodeError,
    EncodeError,
    decode_message,
    decode_session,
    encode_message,
    encode_session,
)

RETURN_VERSION = """
local version = version_of(ARGV[1])
if version == nil then return 'nil' end
return string.format('%d', version)
"""
NOW = datetime(2026, 5, 17, 12, 30, 45, 123456, tzinfo=timezone.utc)


def make_state(version: int = 7, **changes: Any) -> SessionState:
    session = Session(
        id="sid",
        user_id="user",
        data=dict(RICH_DATA),
        created_at=NOW,
        updated_at=NOW + timedelta(seconds=1),
        expires_at=NOW + timedelta(hours=1),
        version=version,
    )
    fields = {**session.__dict__, **changes}
    return SessionState(session=Session(**fields), conversation="conv")


def make_message(seq: int = 3) -> Message:
    return Message(
        session_id="sid",
        seq=seq,
        id="m",
        role="user",
        content="hello ✓",
        metadata={"k": [1, None]},
        created_at=NOW,
    )


# --------------------------------------------------------------------------- serializer


def test_session_roundtrip() -> None:
    state = make_state()
    assert decode_session(encode_session(state), "sid") == state


def test_session_roundtrip_without_user_or_expiry() -> None:
    state = make_state(user_id=None, expires_at=None, data={})
    assert decode_session(encode_session(state), "sid") == state


def test_message_roundtrip() -> None:
    message = make_message()
    assert decode_message(encode_message(message), "sid") == message


def test_timestamps_roundtrip_exactly() -> None:
    for moment in (
        NOW,
        datetime(1970, 1, 1, tzinfo=timezone.utc),
        datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc),
    ):
        assert from_micros(to_micros(moment)) == moment
    offset = NOW.astimezone(timezone(timedelta(hours=5)))
    assert from_micros(to_micros(offset)) == NOW


def test_values_carry_a_format_header() -> None:
    decoded = msgpack.unpackb(encode_session(make_state(version=300)))
    assert decoded[:2] == [FORMAT_VERSION, 300]
    assert msgpack.unpackb(encode_message(make_message(seq=9)))[:2] == [FORMAT_VERSION, 9]
    assert msgpack.unpackb(TOMBSTONE) == [FORMAT_VERSION, None]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"garbage",
        "text",
        None,
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
        msgpack.packb([FORMAT_VERSION + 1, 1, None, "c", {}, 0, 0, None]),
        msgpack.packb([True, 1, None, "c", {}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {}, 0, 0]),
        msgpack.packb([FORMAT_VERSION, 0, None, "c", {}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, True, None, "c", {}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, 5, "c", {}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, None, {}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", [], 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {"b": b"bytes"}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {"e": msgpack.ExtType(5, b"x")}, 0, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {}, 1.5, 0, None]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {}, 0, 0, 2**62]),
        msgpack.packb([FORMAT_VERSION, 1, None, "c", {1: 2}, 0, 0, None]),
        encode_session(make_state())[:-3],
        encode_session(make_state()) + b"\x00",
        TOMBSTONE,
    ],
)
def test_garbage_sessions_fail_to_decode(raw: Any) -> None:
    with pytest.raises(DecodeError):
        decode_session(raw, "sid")


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        msgpack.packb([FORMAT_VERSION, 0, "m", "r", "c", {}, 0]),
        msgpack.packb([FORMAT_VERSION, 1, 5, "r", "c", {}, 0]),
        msgpack.packb([FORMAT_VERSION, 1, "m", "r", "c", [], 0]),
        msgpack.packb([FORMAT_VERSION, 1, "m", "r", "c", {}, "0"]),
        encode_session(make_state()),
    ],
)
def test_garbage_messages_fail_to_decode(raw: Any) -> None:
    with pytest.raises(DecodeError):
        decode_message(raw, "sid")


def test_unencodable_value() -> None:
    with pytest.raises(EncodeError):
        encode_session(make_state(data={"v": object()}))


# --------------------------------------------------------------------------- protocol rules


def test_keys_share_the_session_hash_tag() -> None:
    keys = session_keys("p:", "abc")
    assert keys.all() == (
        "p:{abc}:s",
        "p:{abc}:s:lease",
        "p:{abc}:m",
        "p:{abc}:m:seq",
        "p:{abc}:m:lease",
    )


def test_cache_px() -> None:
    now = to_micros(NOW)
    assert cache_px(None, now, 3600) == 3_600_000
    assert cache_px(now + 10_000_000, now, 3600) == 10_000
    assert cache_px(now + 500, now, 3600) is None  # under a millisecond left
    assert cache_px(now - 1, now, 3600) is None


def test_lease_wait_delays_add_up() -> None:
    delays = list(lease_wait_delays(0.1))
    assert sum(delays) == pytest.approx(0.1)
    assert delays[0] == 0.002 and delays[1] == 0.004
    assert list(lease_wait_delays(0)) == []


def test_is_contiguous() -> None:
    assert is_contiguous([]) and is_contiguous([4]) and is_contiguous([2, 3, 4])
    assert not is_contiguous([2, 4]) and not is_contiguous([3, 2])


@given(
    last=st.integers(0, 30),
    after=st.none() | st.integers(0, 35),
    before=st.none() | st.integers(0, 35),
    limit=st.none() | st.integers(0, 35),
)
def test_window_bounds_match_the_reference(
    last: int, after: int | None, before: int | None, limit: int | None
) -> None:
    messages = [make_message(seq) for seq in range(1, last + 1)]
    window = MessageWindow(after_seq=after, before_seq=before, limit=limit)
    low, high = window.bounds(last)
    chosen = [m for m in messages if low <= m.seq <= high]
    assert chosen == reference_window(messages, after_seq=after, before_seq=before, limit=limit)


def test_parse_read_reply() -> None:
    reply = parse_read_reply([1, b"value", 0, 1, b"m1", b"m2"])
    assert (reply.session, reply.value, reply.dropped, reply.tail) == (
        SessionRead.HIT,
        b"value",
        False,
        TailRead.HIT,
    )
    assert reply.messages == (b"m1", b"m2")
    assert parse_read_reply([2, b"", 1, 0]).session is SessionRead.LEASED
    assert parse_read_reply([1, TOMBSTONE, 0, 0]).is_tombstone
    for bad in (None, [1], [9, b"", 0, 0], [1, "str", 0, 0], [1, b"", 0, 7]):
        with pytest.raises(ProtocolError):
            parse_read_reply(bad)


def test_parse_read_session_reply() -> None:
    hit = parse_read_session_reply(b"value")
    assert (hit.session, hit.value, hit.dropped, hit.tail, hit.messages) == (
        SessionRead.HIT,
        b"value",
        False,
        TailRead.NONE,
        (),
    )
    assert parse_read_session_reply(TOMBSTONE).is_tombstone
    leased = parse_read_session_reply(int(SessionRead.LEASED))
    assert (leased.session, leased.value, leased.dropped) == (SessionRead.LEASED, None, False)
    busy = parse_read_session_reply(SessionRead.BUSY + READ_DROPPED)
    assert (busy.session, busy.dropped) == (SessionRead.BUSY, True)
    for bad in (None, "str", True, 0, int(SessionRead.HIT), int(SessionRead.MISSING), 99, [1]):
        with pytest.raises(ProtocolError):
            parse_read_session_reply(bad)


def test_parse_fill_reply() -> None:
    assert parse_fill_reply(1) is FillResult.INSTALLED
    assert parse_fill_reply(-1) is FillResult.NEWER_CACHED
    for bad in (2, b"1", None):
        with pytest.raises(ProtocolError):
            parse_fill_reply(bad)


# --------------------------------------------------------------------------- Lua


@pytest.fixture(scope="module")
def lua() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@settings(max_examples=60, deadline=None)
@given(version=st.integers(1, 2**53))
def test_lua_reads_the_version_python_wrote(lua: fakeredis.FakeRedis, version: int) -> None:
    script = lua.register_script(VERSION_OF_LUA + RETURN_VERSION)
    assert script(args=[encode_session(make_state(version=version))]) == str(version).encode()
    assert script(args=[encode_message(make_message(seq=version))]) == str(version).encode()


@pytest.mark.parametrize(
    "raw",
    [
        TOMBSTONE,
        b"",
        b"\x92",
        b"garbage",
        msgpack.packb([FORMAT_VERSION + 1, 5]),
        msgpack.packb([FORMAT_VERSION, "5"]),
    ],
)
def test_lua_finds_no_version_in_garbage(lua: fakeredis.FakeRedis, raw: bytes) -> None:
    script = lua.register_script(VERSION_OF_LUA + RETURN_VERSION)
    assert script(args=[raw]) == b"nil"


def test_fill_needs_its_own_lease(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "fill").all()[:2]
    fill = lua.register_script(FILL_SESSION)
    value = encode_session(make_state(version=5))
    assert fill(keys=keys, args=["token", value, 5, 10_000]) == FillResult.LEASE_LOST
    lua.set(keys[1], "other")
    assert fill(keys=keys, args=["token", value, 5, 10_000]) == FillResult.LEASE_LOST
    lua.set(keys[1], "token")
    assert fill(keys=keys, args=["token", value, 5, 10_000]) == FillResult.INSTALLED
    assert lua.exists(keys[1]) == 0
    lua.set(keys[1], "token")
    older = encode_session(make_state(version=4))
    assert fill(keys=keys, args=["token", older, 4, 10_000]) == FillResult.NEWER_CACHED
    assert lua.get(keys[0]) == value


def test_read_session_hits_leases_and_drops(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "read").all()[:2]
    read = lua.register_script(READ_SESSION)
    value = encode_session(make_state(version=3))
    # A miss takes the fill lease for this reader; the next reader finds it busy.
    assert read(keys=keys, args=read_session_args("mine", 10_000)) == SessionRead.LEASED
    assert lua.get(keys[1]) == b"mine"
    assert 0 < lua.pttl(keys[1]) <= 10_000
    assert read(keys=keys, args=read_session_args("other", 10_000)) == SessionRead.BUSY
    assert lua.get(keys[1]) == b"mine"
    # A hit is the value itself, and leaves the lease alone.
    lua.set(keys[0], value)
    assert read(keys=keys, args=read_session_args("other", 10_000)) == value
    # Asked to drop a value that has changed meanwhile, it keeps the new one.
    assert read(keys=keys, args=read_session_args("x", 10_000, drop_value=b"old")) == value
    # An undecodable value the client names is dropped, then read as a miss.
    lua.delete(keys[1])
    lua.set(keys[0], b"garbage")
    dropped = read(keys=keys, args=read_session_args("mine", 10_000, drop_value=b"garbage"))
    assert dropped == SessionRead.LEASED + READ_DROPPED
    assert lua.exists(keys[0]) == 0
    # So are an empty value and a key of the wrong type, without being named.
    lua.set(keys[0], b"")
    assert read(keys=keys, args=read_session_args("x", 10_000)) == SessionRead.BUSY + READ_DROPPED
    lua.rpush(keys[0], b"a list")
    assert read(keys=keys, args=read_session_args("x", 10_000)) == SessionRead.BUSY + READ_DROPPED
    assert lua.exists(keys[0]) == 0


def test_writer_replaces_only_older_copies(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "write").all()[:2]
    write = lua.register_script(WRITE_SESSION)
    v5, v6, v7 = (encode_session(make_state(version=v)) for v in (5, 6, 7))
    assert write(keys=keys, args=[v6, 6, 10_000]) == 0
    assert lua.exists(keys[0]) == 0  # never into an absent key
    lua.set(keys[0], v7)
    lua.set(keys[1], "someone's lease")
    assert write(keys=keys, args=[v6, 6, 10_000]) == 0
    assert lua.get(keys[0]) == v7
    assert lua.exists(keys[1]) == 0  # the lease is cancelled either way
    lua.set(keys[0], v5)
    assert write(keys=keys, args=[v6, 6, 10_000]) == 1
    assert lua.get(keys[0]) == v6
    lua.set(keys[0], TOMBSTONE)
    assert write(keys=keys, args=[v7, 7, 10_000]) == 0
    assert lua.get(keys[0]) == TOMBSTONE


# --------------------------------------------------------------------------- breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_and_probes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=2.0, clock=clock)
    assert breaker.allow()
    assert breaker.record_failure() is True  # first of a burst
    assert breaker.record_failure() is False
    assert breaker.allow()
    breaker.record_failure()
    assert not breaker.allow() and breaker.is_open
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # probe
    assert breaker.record_failure() is False
    assert not breaker.allow()
    clock.now += 2.1
    assert breaker.record_success() == 4
    assert breaker.allow() and breaker.record_success() == 0


def test_breaker_survives_a_clock_going_back() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=60.0, clock=clock)
    breaker.record_failure()
    assert not breaker.allow()
    clock.now -= 5
    assert breaker.allow()


def test_breaker_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0, cooldown=1, clock=Clock())
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=1, cooldown=-1, clock=Clock())


# --------------------------------------------------------------------------- the tail's budget


def sized_entry(seq: int, size: int) -> bytes:
    """Return an encoded message of about `size` bytes (a few more: msgpack headers)."""
    entry = encode_message(make_message(seq=seq))
    pad = size - len(entry)
    assert pad >= 0
    return encode_message(
        Message(
            session_id="sid",
            seq=seq,
            id="m",
            role="user",
            content="hello ✓" + "p" * pad,
            metadata={"k": [1, None]},
            created_at=NOW,
        )
    )


def tail_state(lua: fakeredis.FakeRedis, keys: Any) -> tuple[list[bytes], bytes | None]:
    return lua.lrange(keys.tail, 0, -1), lua.get(keys.fence)


def append(
    lua: fakeredis.FakeRedis, keys: Any, entry: bytes, seq: int, limit: int, budget: int
) -> None:
    write = lua.register_script(WRITE_MESSAGE)
    # The append follows the cached session's version (else the tail is dropped).
    lua.set(keys.value, encode_session(make_state(version=seq)))
    session = encode_session(make_state(version=seq + 1))
    write(keys=keys.all(), args=[session, seq + 1, 10_000, entry, seq, limit, budget])


def test_append_trims_the_tail_to_its_budget(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "budget-append")
    lua.set(keys.fence, b"0:0:1")
    entries = [sized_entry(seq, size) for seq, size in enumerate([100, 300, 500, 250, 900], 1)]
    for seq, entry in enumerate(entries[:4], 1):
        append(lua, keys, entry, seq, limit=10, budget=1000)
    # About 100 + 300 + 500 fit; 250 more pushes the two oldest out.
    assert tail_state(lua, keys) == (entries[2:4], b"4:%d:1" % sum(map(len, entries[2:4])))
    append(lua, keys, entries[4], 5, limit=10, budget=1000)
    assert tail_state(lua, keys) == ([entries[4]], b"5:%d:1" % len(entries[4]))
    # The count limit still holds alongside the budget.
    for seq in range(6, 9):
        append(lua, keys, sized_entry(seq, 64), seq, limit=2, budget=1000)
    cached, fence = tail_state(lua, keys)
    assert len(cached) == 2 and fence == b"8:%d:1" % sum(map(len, cached))


def test_append_of_a_message_over_the_budget_empties_the_tail(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "budget-huge")
    lua.set(keys.fence, b"2:200:0")
    lua.rpush(keys.tail, sized_entry(1, 100), sized_entry(2, 100))
    append(lua, keys, sized_entry(3, 5000), 3, limit=10, budget=1000)
    assert tail_state(lua, keys) == ([], b"3:0:1")
    small = sized_entry(4, 100)
    append(lua, keys, small, 4, limit=10, budget=1000)
    assert tail_state(lua, keys) == ([small], b"4:%d:1" % len(small))
    # A gap (an update that has not arrived) drops the tail; so does a garbage fence.
    append(lua, keys, sized_entry(6, 100), 6, limit=10, budget=1000)
    assert tail_state(lua, keys) == ([], None)
    lua.set(keys.fence, b"6")
    lua.rpush(keys.tail, small)
    append(lua, keys, sized_entry(7, 100), 7, limit=10, budget=1000)
    assert tail_state(lua, keys) == ([], None)


def test_fill_tail_installs_within_the_budget_and_only_longer(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "budget-fill")
    fill = lua.register_script(FILL_TAIL)
    tail_keys = (keys.tail, keys.fence, keys.tail_lease)
    entries = [sized_entry(seq, 200) for seq in range(1, 6)]

    def run(last: int, budget: int, complete: int, messages: list[bytes]) -> int:
        lua.set(keys.tail_lease, b"t")
        return int(fill(keys=tail_keys, args=["t", last, 10_000, budget, complete, *messages]))

    # Over the budget: refused, whatever the client says.
    assert run(5, 300, 1, entries[3:]) == FillResult.NEWER_CACHED
    assert tail_state(lua, keys) == ([], None)
    assert run(5, 1000, 0, entries[3:]) == FillResult.INSTALLED  # the lease was released
    assert tail_state(lua, keys) == (entries[3:], b"5:%d:0" % sum(map(len, entries[3:])))
    # The same fence: only a longer tail replaces it.
    assert run(5, 1000, 0, entries[4:]) == FillResult.NEWER_CACHED
    assert run(5, 1000, 1, entries[1:]) == FillResult.INSTALLED
    assert tail_state(lua, keys) == (entries[1:], b"5:%d:1" % sum(map(len, entries[1:])))
    assert run(4, 1000, 1, entries[:4]) == FillResult.NEWER_CACHED
    # An empty tail after a message over the budget.
    assert run(6, 1000, 1, []) == FillResult.INSTALLED
    assert tail_state(lua, keys) == ([], b"6:0:1")


def test_read_leases_an_incomplete_tail_only_for_windows_reaching_the_end(
    lua: fakeredis.FakeRedis,
) -> None:
    keys = session_keys("unit:", "budget-read")
    read = lua.register_script(READ)
    lua.set(keys.value, encode_session(make_state(version=3)))
    entries = [sized_entry(seq, 100) for seq in (4, 5)]
    lua.rpush(keys.tail, *entries)

    def tail_code(window: MessageWindow) -> TailRead:
        lua.delete(keys.tail_lease)
        return parse_read_reply(read(keys=keys.all(), args=read_args("t", 10_000, window))).tail

    lua.set(keys.fence, b"5:200:0")
    assert tail_code(MessageWindow(limit=2)) is TailRead.HIT
    assert tail_code(MessageWindow(limit=3)) is TailRead.LEASED
    assert tail_code(MessageWindow(after_seq=1)) is TailRead.LEASED
    assert tail_code(MessageWindow(limit=3, before_seq=5)) is TailRead.PARTIAL
    lua.set(keys.fence, b"5:200:1")
    assert tail_code(MessageWindow(limit=3)) is TailRead.PARTIAL
    # A cold session takes both leases in one round trip.
    lua.delete(keys.value, keys.tail, keys.fence)
    reply = parse_read_reply(read(keys=keys.all(), args=read_args("t", 10_000, MessageWindow())))
    assert (reply.session, reply.tail) == (SessionRead.LEASED, TailRead.LEASED)
    assert lua.get(keys.lease) == lua.get(keys.tail_lease) == b"t"


def test_fill_session_and_tail_installs_both_under_their_leases(lua: fakeredis.FakeRedis) -> None:
    keys = session_keys("unit:", "budget-both")
    fill = lua.register_script(FILL_SESSION_AND_TAIL)
    value = encode_session(make_state(version=4))
    entries = [sized_entry(seq, 100) for seq in (6, 7)]
    args = ["t", value, 4, 10_000, 7, 10_000, 1000, 0, *entries]
    lua.set(keys.lease, b"t")
    lua.set(keys.tail_lease, b"t")
    assert parse_fill_pair_reply(fill(keys=keys.all(), args=args)) == (
        FillResult.INSTALLED,
        FillResult.INSTALLED,
    )
    assert lua.get(keys.value) == value
    assert tail_state(lua, keys) == (entries, b"7:%d:0" % sum(map(len, entries)))
    assert lua.exists(keys.lease, keys.tail_lease) == 0
    # Each half needs its own lease: a writer that took the tail's cancels only that.
    lua.delete(keys.value, keys.tail, keys.fence)
    lua.set(keys.lease, b"t")
    assert parse_fill_pair_reply(fill(keys=keys.all(), args=args)) == (
        FillResult.INSTALLED,
        FillResult.LEASE_LOST,
    )
    assert tail_state(lua, keys) == ([], None)
    for bad in ([1], [1, 2, 3], b"1", [1, 5]):
        with pytest.raises(ProtocolError):
            parse_fill_pair_reply(bad)
