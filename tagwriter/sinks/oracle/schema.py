"""The table in Oracle's words: the data-dictionary queries and the type rules of DESIGN.md's table."""

from __future__ import annotations

import re
from typing import Any

COLUMNS_SQL = (
    "SELECT column_name, data_type, char_length, data_precision, data_scale, nullable "
    "FROM all_tab_columns WHERE owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND table_name = :1 "
    "ORDER BY column_id"
)

KEYS_SQL = (
    "SELECT c.constraint_type, c.constraint_name, cc.column_name "
    "FROM all_constraints c JOIN all_cons_columns cc "
    "ON cc.owner = c.owner AND cc.constraint_name = c.constraint_name "
    "WHERE c.owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND c.table_name = :1 "
    "AND c.constraint_type IN ('P', 'U') AND c.status = 'ENABLED' "
    "UNION ALL "
    "SELECT 'I', i.index_name, ic.column_name "
    "FROM all_indexes i JOIN all_ind_columns ic ON ic.index_owner = i.owner AND ic.index_name = i.index_name "
    "WHERE i.table_owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') AND i.table_name = :2 "
    "AND i.uniqueness = 'UNIQUE' "
    "ORDER BY 1, 2"
)


def pick_key(keys: dict[tuple[str, str], list[str]], wanted: set[str]) -> list[str]:
    """The primary key; else a unique constraint or index on exactly the wanted columns; else []."""
    for kind in ("P", "U", "I"):
        for (k, _), cols in sorted(keys.items()):
            if k == kind and (kind == "P" or set(cols) == wanted):
                return cols
    return []


def type_name(dtype: str, length: Any, precision: Any, scale: Any) -> str:
    dtype = str(dtype)
    if dtype in ("VARCHAR2", "NVARCHAR2", "CHAR", "NCHAR") and length:
        return f"{dtype}({int(length)})"
    if dtype == "NUMBER":
        if precision is None:
            return "NUMBER" if scale is None else f"NUMBER(*,{int(scale)})"
        return f"NUMBER({int(precision)})" if not scale else f"NUMBER({int(precision)},{int(scale)})"
    if dtype == "FLOAT" and precision is not None:
        return f"FLOAT({int(precision)})"
    return dtype


def is_text_128(t: str) -> bool:
    m = re.fullmatch(r"N?VARCHAR2\((\d+)\)", t)
    return bool(m) and int(m.group(1)) >= 128  # type: ignore[union-attr]


def is_timestamp_6(t: str) -> bool:
    m = re.fullmatch(r"TIMESTAMP\((\d)\)", t)
    return bool(m) and int(m.group(1)) >= 6  # type: ignore[union-attr]


def is_integer_5(t: str) -> bool:
    if t in ("NUMBER", "NUMBER(*,0)", "INTEGER"):
        return True
    m = re.fullmatch(r"NUMBER\((\d+)\)", t)
    return bool(m) and int(m.group(1)) >= 5  # type: ignore[union-attr]
