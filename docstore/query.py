"""Filters and orderings: parsed once into plain values, then compiled to SQL.

`parse_filters` and `parse_order_by` validate a caller's query and return
`Condition` / `SortKey` values that every store understands; the memory store
evaluates them in Python, `compile_where` / `compile_order_by` turn them into
parameterised SQL for PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from .errors import InvalidDocument, InvalidQuery
from .store import check_json_value, exact_numbers

__all__ = [
    "Condition",
    "SortKey",
    "OPERATORS",
    "SPECIAL_SORT_FIELDS",
    "parse_path",
    "parse_filters",
    "parse_order_by",
    "parse_index_order",
    "check_paging",
    "keyset_columns",
    "keyset_values",
    "compile_keyset",
    "keyset_params",
    "compile_where",
    "condition_params",
    "condition_shape",
    "compile_order_by",
    "path_expression",
    "PercentSafeIdentifier",
    "PercentSafeLiteral",
]

OPERATORS = frozenset(
    {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$contains", "$regex"}
)
RANGE_OPERATORS = frozenset({"$gt", "$gte", "$lt", "$lte"})
SPECIAL_SORT_FIELDS = frozenset({"created_at", "updated_at", "id"})


@dataclass(frozen=True)
class Condition:
    """One test on one field: `path` (segments), an operator such as "$eq", its operand."""

    path: tuple[str, ...]
    op: str
    operand: Any


@dataclass(frozen=True)
class SortKey:
    """One ordering key: a data path, or a metadata column (`column` set)."""

    path: tuple[str, ...]
    descending: bool
    column: str | None = None


def parse_path(path: object) -> tuple[str, ...]:
    """Split a dotted field path into its segments, or raise InvalidQuery."""
    if not isinstance(path, str) or not path:
        raise InvalidQuery(f"a field path must be a non-empty str, not {path!r}")
    if "\x00" in path:
        raise InvalidQuery("a field path must not contain NUL characters")
    segments = tuple(path.split("."))
    if any(not segment for segment in segments):
        raise InvalidQuery(f"field path {path!r} has an empty segment")
    return segments


def parse_link(link: object, filters: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate `read_with`'s link, a (related documents' path, read document's path) pair."""
    if not isinstance(link, tuple | list) or len(link) != 2:
        raise InvalidQuery(f"link must be a (related path, own path) pair, not {link!r}")
    related_path, own_path = parse_path(link[0]), parse_path(link[1])
    if isinstance(filters, Mapping) and link[0] in filters:
        raise InvalidQuery(f"filters already constrain the link path {link[0]!r}")
    return related_path, own_path


def linked_filters(
    filters: Mapping[str, Any] | None,
    related_path: tuple[str, ...],
    own_path: tuple[str, ...],
    data: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Return `filters` and the link to `data`'s value at `own_path`, for `query`;
    None when that value is missing or null (the document links to nothing)."""
    value: Any = data
    for segment in own_path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(segment)
    if value is None:
        return None
    return {**(filters or {}), ".".join(related_path): {"$eq": value}}


def _json_operand(value: object, op: str) -> Any:
    try:
        check_json_value(value, op)
    except InvalidDocument as exc:
        raise InvalidQuery(f"{op} operand is not JSON: {exc}") from exc
    # Tuples become lists and large integral floats exact ints, as they would be stored.
    return json.loads(json.dumps(exact_numbers(value)))


def _parse_operand(op: str, operand: object) -> Any:
    if op in ("$eq", "$ne", "$contains"):
        return _json_operand(operand, op)
    if op in RANGE_OPERATORS:
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise InvalidQuery(f"{op} compares numbers or strings, not {operand!r}")
        return _json_operand(operand, op)
    if op in ("$in", "$nin"):
        if not isinstance(operand, list | tuple):
            raise InvalidQuery(f"{op} takes a list, not {type(operand).__name__}")
        return _json_operand(list(operand), op)
    if op == "$exists":
        if not isinstance(operand, bool):
            raise InvalidQuery(f"$exists takes True or False, not {operand!r}")
        return operand
    if op == "$regex":
        if not isinstance(operand, str) or "\x00" in operand:
            raise InvalidQuery(f"$regex takes a pattern string, not {operand!r}")
        try:
            re.compile(operand)
        except re.error as exc:
            raise InvalidQuery(f"$regex pattern {operand!r} is invalid: {exc}") from exc
        return operand
    raise InvalidQuery(f"unknown operator {op!r}")


def _is_operator_dict(value: object) -> bool:
    return isinstance(value, dict) and any(
        isinstance(key, str) and key.startswith("$") for key in value
    )


def parse_filters(filters: object) -> list[Condition]:
    """Validate a filter mapping and return its conditions (all of them must hold)."""
    if filters is None:
        return []
    if not isinstance(filters, Mapping):
        raise InvalidQuery(f"filters must be a mapping, not {type(filters).__name__}")
    conditions: list[Condition] = []
    for field, value in filters.items():
        path = parse_path(field)
        if _is_operator_dict(value):
            for op, operand in value.items():
                if not isinstance(op, str) or op not in OPERATORS:
                    raise InvalidQuery(f"unknown operator {op!r} on {field!r}")
                conditions.append(Condition(path, op, _parse_operand(op, operand)))
        else:
            conditions.append(Condition(path, "$eq", _json_operand(value, "$eq")))
    return conditions


def parse_order_by(order_by: object) -> list[SortKey]:
    """Validate `order_by` and return its keys (ties are broken by id by the caller)."""
    if order_by is None:
        return [SortKey((), False, "created_at")]
    names: Sequence[object]
    if isinstance(order_by, str):
        names = [order_by]
    elif isinstance(order_by, list | tuple):
        names = order_by
    else:
        raise InvalidQuery(f"order_by must be a str or a list of str, not {order_by!r}")
    keys = []
    for name in names:
        if not isinstance(name, str):
            raise InvalidQuery(f"order_by entries must be str, not {name!r}")
        descending = name.startswith("-")
        field = name[1:] if descending else name
        if field in SPECIAL_SORT_FIELDS:
            keys.append(SortKey((), descending, field))
        else:
            keys.append(SortKey(parse_path(field), descending))
    return keys


def parse_index_order(order_by: object) -> list[tuple[str, bool]]:
    """Validate an `ensure_index(order_by=...)` and return its (column, descending) list.

    The same spelling as a query's `order_by`, for the metadata columns only
    (created_at, updated_at, id): they follow the index's paths, so that a
    query filtering on the paths and ordered this way reads the index in order.
    """
    if order_by is None:
        return []
    columns = []
    for key in parse_order_by(order_by):
        if key.column is None:
            raise InvalidQuery(
                "an index's order_by takes the metadata columns created_at, updated_at "
                "and id only (index data paths through `paths`)"
            )
        columns.append((key.column, key.descending))
    return columns


def check_paging(limit: object, offset: object) -> None:
    """Raise InvalidQuery unless limit is None or an int >= 0 and offset an int >= 0."""
    for name, value, nullable in (("limit", limit, True), ("offset", offset, False)):
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidQuery(f"{name} must be an int >= 0, not {value!r}")


def _compact_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class PercentSafeLiteral(sql.Literal):  # type: ignore[type-arg]
    """A literal whose `%` signs survive the driver's parameter formatting.

    Statements are always executed with a parameter sequence (possibly empty),
    so psycopg2 turns `%%` back into `%`.
    """

    def as_string(self, context: Any) -> str:
        return str(super().as_string(context)).replace("%", "%%")


class PercentSafeIdentifier(sql.Identifier):
    """An identifier whose `%` signs survive the driver's parameter formatting."""

    def as_string(self, context: Any) -> str:
        return str(super().as_string(context)).replace("%", "%%")


def path_expression(path: tuple[str, ...]) -> sql.Composable:
    """Return `(data #> ARRAY[...])`, spelled the same in queries and in expression indexes."""
    return sql.SQL("(data #> {})").format(PercentSafeLiteral(list(path)))


def _range_kind(operand: Any) -> str:
    return "string" if isinstance(operand, str) else "number"


def condition_shape(condition: Condition) -> tuple[Any, ...]:
    """Return what decides a condition's SQL text (not its parameters), to cache that text."""
    kind = _range_kind(condition.operand) if condition.op in RANGE_OPERATORS else None
    exists = condition.operand if condition.op == "$exists" else None
    return (condition.path, condition.op, kind, exists)


def _compile_condition(condition: Condition) -> sql.Composable:
    field = path_expression(condition.path)
    op, operand = condition.op, condition.operand
    if op == "$eq":
        return sql.SQL("{} = %s::jsonb").format(field)
    if op == "$ne":
        return sql.SQL("{} IS DISTINCT FROM %s::jsonb").format(field)
    if op == "$in":
        # The list behind a scalar subquery: PostgreSQL then plans for a short
        # list (it cannot see the values) instead of estimating each value, which
        # for a thousand values costs tens of milliseconds of planning and, with
        # no statistics of the expression, adds up to "most of the table" and
        # a sequential scan. The index on the path serves it either way.
        return sql.SQL("{} = ANY((SELECT %s::jsonb[])::jsonb[])").format(field)
    if op == "$nin":
        return sql.SQL("({0} IS NULL OR NOT ({0} = ANY(%s::jsonb[])))").format(field)
    if op in RANGE_OPERATORS:
        symbol = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
        return sql.SQL("(jsonb_typeof({0}) = {1} AND {0} {2} %s::jsonb)").format(
            field, sql.Literal(_range_kind(operand)), sql.SQL(symbol)
        )
    if op == "$exists":
        return sql.SQL("{} IS NOT NULL" if operand else "{} IS NULL").format(field)
    if op == "$contains":
        return sql.SQL("{} @> %s::jsonb").format(field)
    if op == "$regex":
        return sql.SQL("(jsonb_typeof({0}) = 'string' AND ({0} #>> '{{}}') ~ %s)").format(field)
    raise InvalidQuery(f"unknown operator {op!r}")  # parse_filters already refused it


def condition_params(conditions: Sequence[Condition]) -> list[Any]:
    """Return the bound parameters of `compile_where(conditions)`, in order."""
    params: list[Any] = []
    for condition in conditions:
        op, operand = condition.op, condition.operand
        if op in ("$in", "$nin"):
            params.append([_compact_dumps(item) for item in operand])
        elif op == "$regex":
            params.append(operand)
        elif op != "$exists":
            params.append(_compact_dumps(operand))
    return params


def compile_where(conditions: Sequence[Condition]) -> sql.Composable:
    """Return the SQL conjunction of `conditions` (TRUE when empty); see `condition_params`."""
    if not conditions:
        return sql.SQL("TRUE")
    return sql.SQL(" AND ").join(_compile_condition(c) for c in conditions)


def compile_order_by(keys: Sequence[SortKey]) -> sql.Composable:
    """Return the ORDER BY list for `keys`, with id breaking the remaining ties."""
    parts: list[sql.Composable] = []
    for key in keys:
        direction = sql.SQL(" DESC NULLS FIRST" if key.descending else " ASC NULLS LAST")
        if key.column is not None:
            target: sql.Composable = sql.Identifier(key.column)
        else:
            target = path_expression(key.path)
        parts.append(sql.Composed([target, direction]))
    parts.append(sql.SQL("id ASC"))
    return sql.SQL(", ").join(parts)


def keyset_columns(keys: Sequence[SortKey]) -> list[tuple[str, bool]]:
    """Return the (column, descending) list a keyset cursor compares, id last.

    Keyset paging (`query(after=...)`) is offered for orderings on the
    metadata columns only: they are never missing and compare simply.
    """
    columns: list[tuple[str, bool]] = []
    for key in keys:
        if key.column is None:
            raise InvalidQuery("after= needs an order_by of created_at, updated_at or id only")
        columns.append((key.column, key.descending))
    if all(column != "id" for column, _ in columns):
        columns.append(("id", False))
    return columns


def keyset_values(after: object, columns: Sequence[tuple[str, bool]]) -> list[Any]:
    """Return the cursor document's values of `columns`."""
    from .document import Document

    if not isinstance(after, Document):
        raise InvalidQuery(f"after must be a Document from a previous page, not {after!r}")
    return [getattr(after, column) for column, _ in columns]


def compile_keyset(columns: Sequence[tuple[str, bool]]) -> sql.Composable:
    """Return `(rows strictly after the cursor in this order)`; see `keyset_params`."""
    branches = []
    for index, (column, descending) in enumerate(columns):
        equal = [sql.SQL("{} = %s").format(sql.Identifier(name)) for name, _ in columns[:index]]
        beyond = sql.SQL("{} {} %s").format(
            sql.Identifier(column), sql.SQL("<" if descending else ">")
        )
        branches.append(sql.SQL("({})").format(sql.SQL(" AND ").join([*equal, beyond])))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(branches))


def keyset_params(values: Sequence[Any]) -> list[Any]:
    """Return the parameters of `compile_keyset`, in order."""
    params: list[Any] = []
    for index in range(len(values)):
        params.extend(values[: index + 1])
    return params
