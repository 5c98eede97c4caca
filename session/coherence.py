"""The cache coherence protocol: key names, Lua scripts, and what each reply means.

Nothing here performs I/O. `store.SessionStore` runs these scripts with a
`redis.Redis` client; an asyncio store can run the same scripts with
`redis.asyncio` and share every rule below. See docs/session.md for why the
protocol never serves a version older than one a write has returned.

In short (memcache leases plus version fencing):

* every cached value carries the PostgreSQL version it was read at (for the
  message tail: the seq of its last message), the fencing token;
* a reader that misses takes a fill lease (`SET NX PX`) *before* it reads
  PostgreSQL and installs what it read only if the lease is still its own and
  no newer value is cached (`FILL_SESSION`, `FILL_TAIL`);
* a writer, after COMMIT, replaces a cached value only if one is present
  with an older version and deletes the fill leases (`WRITE_SESSION`,
  `WRITE_MESSAGE`), so a fill that read PostgreSQL before the commit cannot
  land; a writer never installs into an absent key;
* a delete leaves a tombstone (`INVALIDATE`), which no fill replaces;
* the message tail has a byte budget on top of its count limit: it holds the
  newest messages that fit, and a message larger than the budget is never
  cached (the tail then restarts after it); the fence also records the tail's
  bytes, so an append trims without reading the list;
* all keys of a session share one hash tag, so every script touches a single
  Redis Cluster slot.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .serializer import FORMAT_VERSION, TOMBSTONE

__all__ = [
    "namespaced_source",
    "glob_escape",
    "SessionKeys",
    "session_keys",
    "session_value_keys",
    "check_key_prefix",
    "fence_kind",
    "FenceResult",
    "FENCE_KEY",
    "FENCE_VALUE",
    "FENCE_TAIL",
    "FENCE_TOKEN",
    "FENCE_SEQ",
    "new_lease_token",
    "cache_px",
    "SessionRead",
    "TailRead",
    "ReadReply",
    "read_args",
    "parse_read_reply",
    "read_session_args",
    "parse_read_session_reply",
    "READ_DROPPED",
    "READ_SESSION",
    "FillResult",
    "parse_fill_reply",
    "MessageWindow",
    "lease_wait_delays",
    "READ",
    "TAIL_FENCE_LUA",
    "FILL_SESSION",
    "FILL_TAIL",
    "FILL_SESSION_AND_TAIL",
    "parse_fill_pair_reply",
    "WRITE_SESSION",
    "WRITE_MESSAGE",
    "WRITE_REMOVAL",
    "INVALIDATE",
    "SCRIPTS",
    "NO_VALUE",
    "ProtocolError",
    "is_contiguous",
]

# ARGV placeholder for "no number"/"no value"; Lua cannot pass nil inside ARGV.
NO_VALUE = -1


@dataclass(frozen=True)
class SessionKeys:
    """The Redis keys of one session; they share the hash tag `{session id}`."""

    value: str  # the encoded session, or a tombstone
    lease: str  # fill lease for `value`
    tail: str  # list of the newest encoded messages, oldest first
    fence: str  # seq of the tail's last message (the conversation's last seq)
    tail_lease: str  # fill lease for `tail` and `fence`

    def all(self) -> tuple[str, str, str, str, str]:
        """Return every key, in the KEYS order the scripts expect."""
        return (self.value, self.lease, self.tail, self.fence, self.tail_lease)


def check_key_prefix(key_prefix: object) -> None:
    """Raise ValueError unless `key_prefix` can name this store's keys: a str without braces.

    The session id must be the keys' hash tag; a brace in the prefix would steal it.
    """
    if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
        raise ValueError("a key prefix must be a str without braces")


def session_value_keys(key_prefix: str, session_id: str) -> tuple[str, str]:
    """Return the value and lease keys of a session (`session_keys`' first two), for
    the session-only scripts on the hot path."""
    base = f"{key_prefix}{{{session_id}}}"
    return f"{base}:s", f"{base}:s:lease"


def session_keys(key_prefix: str, session_id: str) -> SessionKeys:
    """Return the keys of a session.

    The session id is the hash tag: Redis Cluster hashes only what lies
    between the first `{` and the next `}`, which every key below shares.
    """
    base = f"{key_prefix}{{{session_id}}}"
    return SessionKeys(
        value=f"{base}:s",
        lease=f"{base}:s:lease",
        tail=f"{base}:m",
        fence=f"{base}:m:seq",
        tail_lease=f"{base}:m:lease",
    )


class _LeaseTokens:
    """Tokens unique to this process: a random 64-bit prefix plus a 64-bit counter,
    32 hex digits as the restart fence expects of a lease token.

    Drawing 16 random bytes per lookup (a system call) cost more than the
    rest of building a cache hit's request. A token needs to be unique, not
    secret: whoever can read Redis sees every lease anyway. A forked child
    draws a new prefix, so parent and child never share a token.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def next(self) -> str:
        # next() on itertools.count is atomic under the GIL: no lock needed.
        return f"{self.prefix}{next(self.counter):016x}"


_LEASE_TOKENS = _LeaseTokens()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LEASE_TOKENS.reseed)


def new_lease_token() -> str:
    """Return a fill-lease token no other reader can hold."""
    return _LEASE_TOKENS.next()


def cache_px(expires_at_us: int | None, now_us: int, cache_ttl: float) -> int | None:
    """Return how many milliseconds a value may live in Redis; None if it must not be cached.

    Never longer than `cache_ttl`, never past the session's own expiry.
    """
    px = int(cache_ttl * 1000)
    if expires_at_us is not None:
        px = min(px, (expires_at_us - now_us) // 1000)
    return px if px >= 1 else None


# --- Lua -------------------------------------------------------------------

# Read the integer in the second slot of a msgpack array [FORMAT_VERSION, n, ...]
# without decoding the rest: a session's version, a message's seq. Anything
# else (garbage, another format, a tombstone) gives nil, which no rule treats
# as older than a real version.
VERSION_OF_LUA = f"""
local FORMAT_VERSION = {FORMAT_VERSION}
local INT_WIDTH = {{[0xcc] = 1, [0xcd] = 2, [0xce] = 4, [0xcf] = 8}}
local function version_of(value)
  if type(value) ~= 'string' or #value < 3 then return nil end
  local head = string.byte(value, 1)
  if head < 0x92 or head > 0x9f or string.byte(value, 2) ~= FORMAT_VERSION then
    return nil
  end
  local tag = string.byte(value, 3)
  if tag <= 0x7f then return tag end
  local width = INT_WIDTH[tag]
  if width == nil or #value < 3 + width then return nil end
  local number = 0
  for i = 4, 3 + width do number = number * 256 + string.byte(value, i) end
  return number
end
-- GET that reports a key of the wrong type as `false, true` instead of failing.
local function get_checked(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' then return false, true end
  return value, false
end
-- Replace the cached session only if one is present with an older version.
local function replace_if_older(key, value, version, px)
  local current = get_checked(key)
  local cached = version_of(current)
  if cached ~= nil and cached < version then
    redis.call('SET', key, value, 'PX', px)
    return 1
  end
  return 0
end
"""

# The tail's fence, '<last seq>:<tail bytes>:<complete 0|1>'. `complete` says the
# tail holds every message it can (older ones do not fit or do not exist), so a
# read reaching further back goes to the docstore without asking to refill it.
TAIL_FENCE_LUA = """
local function fence_of(key)
  local value = redis.pcall('GET', key)
  if not value then return nil end
  if type(value) ~= 'string' then return false end
  local last, bytes, complete = string.match(value, '^(%d+):(%d+):([01])$')
  if not last then return false end
  return tonumber(last), tonumber(bytes), complete == '1'
end
local function fence_value(last, bytes, complete)
  return string.format('%d:%d:%d', last, bytes, complete and 1 or 0)
end
"""

_TOMBSTONE_LUA = "".join(f"\\{byte}" for byte in TOMBSTONE)


class SessionRead(IntEnum):
    """What the READ script found for the session value."""

    HIT = 1  # the value (or a tombstone) follows
    LEASED = 2  # missing; this reader now holds the fill lease
    BUSY = 3  # missing; another reader holds the fill lease
    MISSING = 4  # missing; no lease was asked for


# Added to a READ_SESSION miss code when an undecodable value was dropped.
READ_DROPPED = 16


class TailRead(IntEnum):
    """What the READ script found for the message tail."""

    NONE = 0  # not asked for, or the session was not a hit
    HIT = 1  # the tail covers the request; the messages follow
    LEASED = 2  # no tail; this reader now holds the tail's fill lease
    BUSY = 3  # no tail; another reader is filling it
    PARTIAL = 4  # a tail is cached but the request reaches older messages


# The session and a window of its message tail, for get_messages.
# KEYS: value, lease, tail, fence, tail_lease.
# ARGV: 1 lease token, 2 lease ms, 3 value to drop ('' for none), 4 take the
# session lease on a miss (0/1), 5 drop the tail (0/1),
# 6 after_seq, 7 before_seq, 8 limit (NO_VALUE for none).
# Reply: {session code, value or '', dropped (0/1), tail code, messages...}.
# A miss that takes the session lease also answers for the tail (so a cold
# read takes both leases in one round trip); a window that reaches the
# conversation's end but older messages than an incomplete tail holds takes
# the tail lease, so its reader can install the longer tail it reads.
READ = (
    TAIL_FENCE_LUA
    + f"""
local TOMBSTONE = "{_TOMBSTONE_LUA}"
local token, lease_ms = ARGV[1], ARGV[2]
local dropped = 0
local code = {SessionRead.HIT}
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' or value == '' or (ARGV[3] ~= '' and value == ARGV[3]) then
  -- A value the client could not decode: drop it, then read as a miss.
  redis.call('DEL', KEYS[1])
  value, dropped = false, 1
end
if not value then
  if ARGV[4] ~= '1' then return {{{SessionRead.MISSING}, '', dropped, 0}} end
  if not redis.call('SET', KEYS[2], token, 'NX', 'PX', lease_ms) then
    return {{{SessionRead.BUSY}, '', dropped, 0}}
  end
  code, value = {SessionRead.LEASED}, ''
elseif value == TOMBSTONE then
  return {{{SessionRead.HIT}, value, dropped, {TailRead.NONE}}}
end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[3], KEYS[4])
  dropped = 1
end
local last, bytes, complete = fence_of(KEYS[4])
local length = redis.pcall('LLEN', KEYS[3])
if last == false or type(length) == 'table' then
  redis.call('DEL', KEYS[3], KEYS[4])
  last, length, dropped = nil, 0, 1
end
if not last then
  if redis.call('SET', KEYS[5], token, 'NX', 'PX', lease_ms) then
    return {{code, value, dropped, {TailRead.LEASED}}}
  end
  return {{code, value, dropped, {TailRead.BUSY}}}
end
-- The tail holds seqs first..last without gaps; last is the conversation's last seq.
local first = last - length + 1
local after, before, limit = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local low, high = 1, last
if after >= 0 then low = after + 1 end
if before >= 0 and before - 1 < high then high = before - 1 end
if limit >= 0 then
  if after >= 0 then
    if low + limit - 1 < high then high = low + limit - 1 end
  elseif high - limit + 1 > low then
    low = high - limit + 1
  end
end
local reply = {{code, value, dropped, {TailRead.HIT}}}
if low > high then return reply end
if low < first then
  if high == last and not complete
    and redis.call('SET', KEYS[5], token, 'NX', 'PX', lease_ms) then
    return {{code, value, dropped, {TailRead.LEASED}}}
  end
  return {{code, value, dropped, {TailRead.PARTIAL}}}
end
local messages = redis.call('LRANGE', KEYS[3], low - first, high - first)
for i = 1, #messages do reply[4 + i] = messages[i] end
return reply
"""
)

# The session alone, for get_session and every write's lookup: the hot path,
# so it is lean (two keys, two or three arguments, a one-item reply).
# KEYS: value, lease. ARGV: 1 lease token, 2 lease ms, 3 (optional) value to drop.
# Reply: the cached value or tombstone on a hit; on a miss the integer
# SessionRead.LEASED or SessionRead.BUSY, plus READ_DROPPED if an undecodable
# value was dropped first.
READ_SESSION = f"""
local value = redis.pcall('GET', KEYS[1])
local dropped = 0
if type(value) == 'table' or value == '' or (ARGV[3] ~= nil and value == ARGV[3]) then
  redis.call('DEL', KEYS[1])
  value, dropped = false, {READ_DROPPED}
end
if value then return value end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {SessionRead.LEASED} + dropped
end
return {SessionRead.BUSY} + dropped
"""

# The two fills as functions, so that a cold get_messages installs the session
# and its tail in one round trip (FILL_SESSION_AND_TAIL).
FILL_LUA = (
    VERSION_OF_LUA
    + TAIL_FENCE_LUA
    + """
local function fill_session(value_key, lease_key, token, value, version, px)
  if redis.call('GET', lease_key) ~= token then return 0 end
  redis.call('DEL', lease_key)
  if value == '' then return 0 end
  local current, wrong_type = get_checked(value_key)
  if wrong_type then return -1 end
  if current then
    local cached = version_of(current)
    if cached == nil or cached >= tonumber(version) then return -1 end
  end
  redis.call('SET', value_key, value, 'PX', px)
  return 1
end
-- The messages are ARGV[first] onwards.
local function fill_tail(tail_key, fence_key, lease_key, token, last, px, budget, complete, first)
  if redis.call('GET', lease_key) ~= token then return 0 end
  redis.call('DEL', lease_key)
  last = tonumber(last)
  if last < 0 then return 0 end
  local count, bytes = #ARGV - first + 1, 0
  for i = first, #ARGV do bytes = bytes + #ARGV[i] end
  if bytes > tonumber(budget) then return -1 end
  local fence = fence_of(fence_key)
  if fence and fence > last then return -1 end
  if fence == last then
    local length = redis.pcall('LLEN', tail_key)
    if type(length) ~= 'table' and length >= count then return -1 end
  end
  redis.call('DEL', tail_key)
  for i = first, #ARGV do redis.call('RPUSH', tail_key, ARGV[i]) end
  if count > 0 then redis.call('PEXPIRE', tail_key, px) end
  redis.call('SET', fence_key, fence_value(last, bytes, complete == '1'), 'PX', px)
  return 1
end
"""
)

# KEYS: value, lease. ARGV: 1 lease token, 2 value ('' only releases the
# lease), 3 its version (0: a tombstone, installed only into an absent key), 4 px.
# Reply: FillResult.
FILL_SESSION = (
    FILL_LUA + "return fill_session(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
)

# KEYS: tail, fence, tail_lease. ARGV: 1 lease token, 2 last seq (-1 only
# releases the lease), 3 px, 4 byte budget, 5 complete (0/1), 6.. the encoded
# messages, oldest first: the newest messages up to last seq that fit.
# Replaces a tail with an older fence, or with the same fence and fewer
# messages. Reply: FillResult (-1 also when the messages exceed the budget).
FILL_TAIL = (
    FILL_LUA
    + "return fill_tail(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)"
)

# Both fills at once. KEYS: value, lease, tail, fence, tail_lease. ARGV: 1 lease
# token (both leases), 2-4 FILL_SESSION's ARGV 2-4, 5-8 FILL_TAIL's ARGV 2-5,
# 9.. the messages. Reply: {session FillResult, tail FillResult}.
FILL_SESSION_AND_TAIL = (
    FILL_LUA
    + """
return {
  fill_session(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4]),
  fill_tail(KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[5], ARGV[6], ARGV[7], ARGV[8], 9),
}
"""
)

# KEYS: value, lease. ARGV: 1 value, 2 its version, 3 px.
# Reply: 1 if the cached value was replaced.
WRITE_SESSION = (
    VERSION_OF_LUA
    + """
local replaced = replace_if_older(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3])
redis.call('DEL', KEYS[2])
return replaced
"""
)

# A cached session, [format, version, user id, conversation, data, created,
# updated, expires] (serializer.encode_session), moved to the next version by
# an append: only the version, updated and expires change, so the new value is
# `head` (array header, format, version) and `tail` (updated, expires) around
# the old value's middle four elements, copied as they are.
PATCH_SESSION_LUA = """
local ELEMENT_WIDTH = {[0xcc] = 1, [0xcd] = 2, [0xce] = 4, [0xcf] = 8,
                       [0xd0] = 1, [0xd1] = 2, [0xd2] = 4, [0xd3] = 8}
-- The position after the msgpack element at `pos` (nil, an int or a str, what a
-- cached session holds); nil for anything else.
local function skip(value, pos)
  local b = string.byte(value, pos)
  if b == nil then return nil end
  if b <= 0x7f or b >= 0xe0 or b == 0xc0 then return pos + 1 end
  if b >= 0xa0 and b <= 0xbf then return pos + 1 + b - 0xa0 end
  local width = ELEMENT_WIDTH[b]
  if width then return pos + 1 + width end
  if b == 0xd9 then
    local n = string.byte(value, pos + 1)
    return n and pos + 2 + n
  end
  if b == 0xda then
    local h, l = string.byte(value, pos + 1, pos + 2)
    return l and pos + 3 + h * 256 + l
  end
  if b == 0xdb then
    local a, b2, c, d = string.byte(value, pos + 1, pos + 4)
    return d and pos + 5 + ((a * 256 + b2) * 256 + c) * 256 + d
  end
  return nil
end
-- The value with `head` and `tail` around its middle four elements; nil if it is
-- not an array of eight such elements ending exactly where the value does.
local function patch_session(value, head, tail)
  if string.byte(value, 1) ~= 0x98 then return nil end
  local middle = skip(value, 2)
  middle = middle and skip(value, middle)
  local stop = middle
  for _ = 1, 4 do stop = stop and skip(value, stop) end
  local finish = stop and skip(value, stop)
  finish = finish and skip(value, finish)
  if finish ~= #value + 1 then return nil end
  return head .. string.sub(value, middle, stop - 1) .. tail
end
"""

# KEYS: value, lease, tail, fence, tail_lease. ARGV: 1 session value, 2 its
# version, 3 px, 4 encoded message, 5 its seq, 6 tail length limit, 7 tail
# byte budget, and (an append that bumped the version by one) 8: then ARGV 1
# and 8 are the head and tail of PATCH_SESSION_LUA, and a cached copy of the
# version before (exactly the state the append started from) is patched; an
# older copy is deleted. Reply: 1 if the cached session was replaced.
WRITE_MESSAGE = (
    VERSION_OF_LUA
    + TAIL_FENCE_LUA
    + PATCH_SESSION_LUA
    + """
local version = tonumber(ARGV[2])
local current = get_checked(KEYS[1])
local cached = version_of(current)
local replaced = 0
if ARGV[8] == nil then
  replaced = replace_if_older(KEYS[1], ARGV[1], version, ARGV[3])
elseif cached ~= nil and cached < version then
  local patched = cached == version - 1 and patch_session(current, ARGV[1], ARGV[8])
  if patched then
    redis.call('SET', KEYS[1], patched, 'PX', ARGV[3])
    replaced = 1
  else
    redis.call('DEL', KEYS[1])
  end
end
local seq = tonumber(ARGV[5])
local last, bytes, complete = fence_of(KEYS[4])
if cached == nil or cached > version then
  -- No current copy, or a later write's script ran first: that may have been a
  -- pop or clear that removed this message again, so the tail must not get it.
  redis.call('DEL', KEYS[3], KEYS[4])
elseif last then
  if last == seq - 1 then
    local limit, budget, size = tonumber(ARGV[6]), tonumber(ARGV[7]), #ARGV[4]
    local length = redis.pcall('LLEN', KEYS[3])
    if type(length) == 'table' then
      redis.call('DEL', KEYS[3])
      length = 0
    end
    if length == 0 then bytes = 0 end
    if size > budget then
      -- Never cached: the tail restarts after this message, and nothing older
      -- can join it again.
      redis.call('DEL', KEYS[3])
      bytes, complete = 0, true
    else
      redis.call('RPUSH', KEYS[3], ARGV[4])
      bytes, length = bytes + size, length + 1
      while length > 0 and (length > limit or bytes > budget) do
        bytes, length = bytes - #redis.call('LPOP', KEYS[3]), length - 1
        complete = true
      end
      if length == 0 then bytes = 0 end
      redis.call('PEXPIRE', KEYS[3], ARGV[3])
    end
    redis.call('SET', KEYS[4], fence_value(seq, bytes, complete), 'PX', ARGV[3])
  elseif last < seq - 1 then
    -- Another append's update has not arrived yet; a tail with a gap is useless.
    redis.call('DEL', KEYS[3], KEYS[4])
  end
elseif last == false then
  redis.call('DEL', KEYS[3], KEYS[4])
end
redis.call('DEL', KEYS[2], KEYS[5])
return replaced
"""
)

# After pop_message / clear_messages. KEYS: value, lease, tail, fence,
# tail_lease. ARGV: 1 session value, 2 its version, 3 px.
# The tail goes (the next reader refills it from PostgreSQL), and with it the
# tail lease, so a fill that read the removed messages cannot land; the
# session copy moves to the new version as in WRITE_SESSION.
# Reply: 1 if the cached session was replaced.
WRITE_REMOVAL = (
    VERSION_OF_LUA
    + """
local replaced = replace_if_older(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return replaced
"""
)

# KEYS: value, lease, tail, fence, tail_lease. ARGV: 1 tombstone ('' for a
# plain delete), 2 its px.
INVALIDATE = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return 1
"""


def namespaced_source(source: str, key_prefix: str) -> str:
    """Return a script's source tagged with the key prefix, so each namespace has its own SHA.

    The store treats "Redis does not know my scripts" as "Redis restarted" and
    then drops its namespace's keys; scripts shared by two namespaces would let
    one tenant's reload hide the restart from the other.
    """
    return f"-- key_prefix {key_prefix.encode('utf-8', 'surrogatepass').hex()}\n{source}"


def glob_escape(text: str) -> str:
    """Return `text` with Redis glob metacharacters escaped, for SCAN MATCH."""
    return "".join(f"\\{char}" if char in "*?[]\\^" else char for char in text)


# Every script by name, as the store registers them.
SCRIPTS = {
    "READ_SESSION": READ_SESSION,
    "READ": READ,
    "FILL_SESSION": FILL_SESSION,
    "FILL_TAIL": FILL_TAIL,
    "FILL_SESSION_AND_TAIL": FILL_SESSION_AND_TAIL,
    "WRITE_SESSION": WRITE_SESSION,
    "WRITE_MESSAGE": WRITE_MESSAGE,
    "WRITE_REMOVAL": WRITE_REMOVAL,
    "INVALIDATE": INVALIDATE,
}


class FenceResult(IntEnum):
    """FENCE_KEY's reply."""

    DROPPED = 1  # it was ours: deleted
    GONE = 0  # it expired or was deleted meanwhile
    FOREIGN = -1  # not what this store writes there: left alone


# --- the restart fence -------------------------------------------------------
#
# A fence deletes only keys it can prove are this store's: the name must be in
# the layout of `session_keys` (prefix, `{<session id>}`, one of the suffixes)
# and the value what this store writes there (our encoding's header, a lease
# token, a seq). Anything else under the prefix belongs to someone else sharing
# it, and is left alone and counted.

# What each kind of key holds, checked by FENCE_KEY.
FENCE_VALUE = "value"  # `:s`: an encoded session or a tombstone
FENCE_TAIL = "tail"  # `:m`: a list of encoded messages
FENCE_TOKEN = "token"  # `:s:lease`, `:m:lease`: a lease token
FENCE_SEQ = "seq"  # `:m:seq`: the tail's fence (its last seq, bytes, completeness)
_FENCE_KINDS = (
    ("}:s", FENCE_VALUE),
    ("}:s:lease", FENCE_TOKEN),
    ("}:m", FENCE_TAIL),
    ("}:m:seq", FENCE_SEQ),
    ("}:m:lease", FENCE_TOKEN),
)
# Session ids are document ids: 1 to 255 characters.
_MAX_SESSION_ID = 255


def fence_kind(key_prefix: str, key: bytes) -> str | None:
    """Return what `key` holds if its name is in this store's layout under `key_prefix`, else None.

    The layout is `<prefix>{<session id>}` plus one of `:s`, `:s:lease`, `:m`,
    `:m:seq`, `:m:lease` (see `session_keys`).
    """
    try:
        name = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    start = key_prefix + "{"
    if not name.startswith(start):
        return None
    rest = name[len(start) :]
    for suffix, kind in _FENCE_KINDS:
        if rest.endswith(suffix) and 0 < len(rest) - len(suffix) <= _MAX_SESSION_ID:
            return kind
    return None


# KEYS: one key whose name is in the layout. ARGV: 1 its kind (FENCE_*).
# Deletes it only if it holds what this store writes there.
# Reply: FenceResult.
FENCE_KEY = f"""
local FORMAT_VERSION = {FORMAT_VERSION}
-- Our encoding's header: a msgpack fixarray of 2 to 15 elements whose first
-- element is a format version this library has written (1 .. current).
local function encoded(value)
  if type(value) ~= 'string' or #value < 2 then return false end
  local head, format = string.byte(value, 1, 2)
  return head >= 0x92 and head <= 0x9f and format >= 1 and format <= FORMAT_VERSION
end
local key, kind = KEYS[1], ARGV[1]
local key_type = redis.call('TYPE', key)['ok']
if key_type == 'none' then return {FenceResult.GONE} end
local ours = false
if kind == '{FENCE_TAIL}' then
  ours = key_type == 'list'
    and encoded(redis.call('LINDEX', key, 0)) and encoded(redis.call('LINDEX', key, -1))
elseif key_type == 'string' then
  local length = redis.call('STRLEN', key)
  if kind == '{FENCE_VALUE}' then
    ours = encoded(redis.call('GETRANGE', key, 0, 1))
  elseif kind == '{FENCE_TOKEN}' then
    ours = length == 32 and string.match(redis.call('GET', key), '^[0-9a-f]+$') ~= nil
  elseif kind == '{FENCE_SEQ}' then
    -- '<last seq>:<tail bytes>:<complete>' (TAIL_FENCE_LUA), or a bare seq
    -- as library versions before the tail's byte budget wrote it.
    local fence = redis.call('GET', key)
    ours = length <= 44 and (string.match(fence, '^[0-9]+:[0-9]+:[01]$') ~= nil
      or string.match(fence, '^[0-9]+$') ~= nil)
  end
end
if not ours then return {FenceResult.FOREIGN} end
redis.call('DEL', key)
return {FenceResult.DROPPED}
"""


# --- replies ---------------------------------------------------------------


@dataclass(frozen=True)
class MessageWindow:
    """Which messages `get_messages` asked for, in the store's paging rules."""

    after_seq: int | None = None
    before_seq: int | None = None
    limit: int | None = None

    def bounds(self, last_seq: int) -> tuple[int, int]:
        """Return the first and last seq wanted, given the conversation's last seq.

        The same rule as the READ script's; an empty window has first > last.
        """
        low = 1 if self.after_seq is None else self.after_seq + 1
        high = last_seq
        if self.before_seq is not None:
            high = min(high, self.before_seq - 1)
        if self.limit is not None:
            if self.after_seq is not None:
                high = min(high, low + self.limit - 1)
            else:
                low = max(low, high - self.limit + 1)
        return low, high

    def seq_filter(self) -> dict[str, int]:
        """Return the docstore operators that bound `seq` for this window."""
        bounds: dict[str, int] = {}
        if self.after_seq is not None:
            bounds["$gt"] = self.after_seq
        if self.before_seq is not None:
            bounds["$lt"] = self.before_seq
        return bounds

    def newest_first(self) -> bool:
        """Return True if the window is the newest N (read descending, then reversed)."""
        return self.limit is not None and self.after_seq is None

    def as_argv(self) -> tuple[int, int, int]:
        """Return after_seq, before_seq, limit as READ's ARGV 6-8."""
        return (
            NO_VALUE if self.after_seq is None else self.after_seq,
            NO_VALUE if self.before_seq is None else self.before_seq,
            NO_VALUE if self.limit is None else self.limit,
        )


def read_args(
    token: str,
    lease_ms: int,
    window: MessageWindow,
    *,
    drop_value: bytes = b"",
    take_lease: bool = True,
    drop_tail: bool = False,
) -> list[object]:
    """Return the ARGV of the READ script."""
    after, before, limit = window.as_argv()
    return [token, lease_ms, drop_value, int(take_lease), int(drop_tail), after, before, limit]


def read_session_args(token: str, lease_ms: int, *, drop_value: bytes = b"") -> list[object]:
    """Return the ARGV of the READ_SESSION script."""
    return [token, lease_ms, drop_value] if drop_value else [token, lease_ms]


class ReadReply(NamedTuple):
    """The READ script's reply, decoded into what the client must do next.

    A named tuple, not a dataclass: one is built on every cache hit, and a
    tuple is built in C.
    """

    session: SessionRead
    value: bytes | None
    dropped: bool
    tail: TailRead
    messages: tuple[bytes, ...]

    @property
    def is_tombstone(self) -> bool:
        """Return True if the session was deleted (a cached tombstone)."""
        return self.value == TOMBSTONE


class ProtocolError(ValueError):
    """A script replied with something the protocol never sends."""


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    raise ProtocolError(f"expected bytes in a script reply, got {type(item).__name__}")


def parse_read_reply(reply: object) -> ReadReply:
    """Return the meaning of a READ reply; raise ProtocolError if it has none."""
    if not isinstance(reply, list) or len(reply) < 4:
        raise ProtocolError("READ replies with a list of at least four items")
    try:
        session = SessionRead(reply[0])
        tail = TailRead(reply[3])
    except ValueError as exc:
        raise ProtocolError(f"unknown READ codes {reply[0]!r}, {reply[3]!r}") from exc
    value = _as_bytes(reply[1]) if session is SessionRead.HIT else None
    return ReadReply(
        session=session,
        value=value,
        dropped=reply[2] == 1,
        tail=tail,
        messages=tuple(_as_bytes(item) for item in reply[4:]),
    )


def parse_read_session_reply(reply: object) -> ReadReply:
    """Return the meaning of a READ_SESSION reply; raise ProtocolError if it has none."""
    if isinstance(reply, bytes):
        return ReadReply(SessionRead.HIT, reply, False, TailRead.NONE, ())
    if isinstance(reply, int) and not isinstance(reply, bool):
        dropped = reply >= READ_DROPPED
        code = reply - READ_DROPPED if dropped else reply
        if code in (SessionRead.LEASED, SessionRead.BUSY):
            return ReadReply(SessionRead(code), None, dropped, TailRead.NONE, ())
    raise ProtocolError(f"unknown READ_SESSION reply of type {type(reply).__name__}")


class FillResult(IntEnum):
    """The outcome of FILL_SESSION / FILL_TAIL."""

    INSTALLED = 1
    LEASE_LOST = 0  # a writer (or an expiry) took the lease: what was read may be stale
    NEWER_CACHED = -1  # a value at least as new is already cached


def parse_fill_reply(reply: object) -> FillResult:
    """Return the meaning of a fill script's reply."""
    if not isinstance(reply, int):
        raise ProtocolError(f"expected an integer fill reply, got {type(reply).__name__}")
    try:
        return FillResult(reply)
    except ValueError as exc:
        raise ProtocolError(f"unknown fill reply {reply!r}") from exc


def parse_fill_pair_reply(reply: object) -> tuple[FillResult, FillResult]:
    """Return the meaning of FILL_SESSION_AND_TAIL's reply: the session's and the tail's."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise ProtocolError("FILL_SESSION_AND_TAIL replies with a list of two results")
    return parse_fill_reply(reply[0]), parse_fill_reply(reply[1])


def lease_wait_delays(total: float, first: float = 0.002) -> Iterator[float]:
    """Yield the pauses of a reader waiting for another reader's fill (doubling, capped)."""
    waited = 0.0
    delay = first
    while waited < total:
        step = min(delay, total - waited)
        yield step
        waited += step
        delay *= 2


def is_contiguous(seqs: Sequence[int]) -> bool:
    """Return True if `seqs` are consecutive integers in ascending order."""
    return all(later == earlier + 1 for earlier, later in zip(seqs, seqs[1:], strict=False))
