"""HCL from data: a small block/expression model serialised with python-hcl2.

Templates are never string-formatted: renderers build `Block`s holding Python values, python-hcl2
writes them, and a final pass aligns `=` the way `packer fmt` does, so committed files pass
`packer fmt -check` unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Expr:
    """A raw HCL expression (var.x, local.y, a type name) written without quotes."""

    text: str


@dataclass
class Block:
    """An HCL block: `type "label" ... { body }`; body values may be Blocks or lists of Blocks."""

    type: str
    labels: tuple[str, ...] = ()
    body: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    if isinstance(v, Expr):
        return "${" + v.text + "}" if "." in v.text else v.text
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    raise TypeError(f"cannot write {type(v).__name__} as HCL")


def _block_body(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in body.items():
        blocks = v if isinstance(v, list) and v and all(isinstance(b, Block) for b in v) else None
        if isinstance(v, Block):
            blocks = [v]
        if blocks is not None:
            out[key] = [_labelled(b) for b in blocks]
        else:
            out[key] = _value(v)
    return out


def _labelled(b: Block) -> dict[str, Any]:
    inner: dict[str, Any] = {**_block_body(b.body), "__is_block__": True}
    for label in reversed(b.labels):
        inner = {f'"{label}"': inner}
    return inner


def dumps(blocks: list[Block]) -> str:
    """Serialise top-level blocks to packer-fmt-clean HCL text."""
    import hcl2

    doc: dict[str, list[Any]] = {}
    for b in blocks:
        doc.setdefault(b.type, []).append(_labelled(b))
    text = hcl2.dumps(
        doc,
        deserializer_options=hcl2.DeserializerOptions(object_elements_trailing_comma=False),
        formatter_options=hcl2.FormatterOptions(
            vertically_align_attributes=False, vertically_align_object_elements=False
        ),
    )
    return fmt(_regroup(text))


def _regroup(text: str) -> str:
    """Blocks of one type are written by hcl2 in one group; restore one blank line between."""
    lines = [line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if not line and out and not out[-1]:
            continue
        out.append(line)
    return "\n".join(out).strip() + "\n"


ATTR_RE = re.compile(r"^(\s*)([A-Za-z_][\w-]*|\"[^\"]*\")\s*=\s(.*)$")


def fmt(text: str) -> str:
    """Align `=` in runs of single-line attributes at the same indent, as `packer fmt` does."""
    lines = text.splitlines()
    out: list[str] = []
    run: list[tuple[str, str, str]] = []

    def flush() -> None:
        width = max((len(k) for _, k, _ in run), default=0)
        out.extend(f"{ind}{k.ljust(width)} = {v}" for ind, k, v in run)
        run.clear()

    for line in lines:
        m = ATTR_RE.match(line)
        single = m and not m.group(3).rstrip().endswith(("[", "{", "("))
        if m and single and (not run or run[0][0] == m.group(1)):
            run.append((m.group(1), m.group(2), m.group(3)))
            continue
        flush()
        if m and single:
            run.append((m.group(1), m.group(2), m.group(3)))
            continue
        if m:  # a multi-line value: its own line, never aligned with neighbours
            out.append(f"{m.group(1)}{m.group(2)} = {m.group(3)}")
            continue
        out.append(line)
    flush()
    return "\n".join(out) + "\n"
