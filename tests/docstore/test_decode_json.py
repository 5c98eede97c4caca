"""`decode_json`: what every store decodes documents with (its fast path included)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from docstore.store import decode_json

INT64 = st.integers(-(2**63), 2**63 - 1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(value=JSON_VALUES, compact=st.booleans())
def test_decodes_what_json_loads_decodes(value: Any, compact: bool) -> None:
    text = json.dumps(value, separators=(",", ":") if compact else None, ensure_ascii=compact)
    assert decode_json(text) == json.loads(text)


@pytest.mark.parametrize("text", [' {"a": 1}', '{"a": 1}\n', "\t[1]\r\n"])
def test_surrounding_whitespace_is_allowed(text: str) -> None:
    assert decode_json(text) == json.loads(text)


def test_integers_beyond_64_bits_become_floats() -> None:
    decoded = decode_json('{"big": 123456789012345678901, "edge": 9223372036854775807}')
    assert decoded == {"big": 1.2345678901234568e20, "edge": 9223372036854775807}
    assert isinstance(decoded["big"], float) and isinstance(decoded["edge"], int)


@pytest.mark.parametrize("text", ["[9223372036854775808]", '{"a": [18446744073709551615]}'])
def test_integers_orjson_would_keep_as_ints_become_floats(text: str) -> None:
    # 2**63 to 2**64 - 1: orjson reads them as ints, so they must not reach it.
    (decoded,) = decode_json(text) if text.startswith("[") else decode_json(text)["a"]
    assert isinstance(decoded, float) and decoded == float(text.strip('[]{}"a: '))


def test_constants_decode_as_json_loads_does() -> None:
    assert math.isnan(decode_json("NaN"))
    assert decode_json("[Infinity, -Infinity]") == [math.inf, -math.inf]


@pytest.mark.parametrize(
    "text", ["", "{", '{"a":1}x', "tru", "\ufeff{}", '{"a":1} {"b":2}', "[1,]", "'a'"]
)
def test_bad_json_raises_what_json_loads_raises(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as raised:
        decode_json(text)
    assert (raised.value.msg, raised.value.pos) == (expected.value.msg, expected.value.pos)
