"""Foreign text made safe to show: control and escape characters become visible, not interpreted.

Lines from builders, guests and tools (a remote build's output, a VM's serial console, Packer's
or nix's messages) reach this terminal. An escape sequence in them could move the cursor,
retitle the window, rewrite what was printed before or hide text; `visible` shows such
characters in caret notation instead (ESC as `^[`, DEL as `^?`), C1 controls and Unicode
direction overrides as `\\x9b` / `\\u202e`. Tabs stay tabs; everything else is left alone.
"""

from __future__ import annotations

import re

# C0 controls except TAB, DEL, C1 controls, and the Unicode characters that reorder or separate
# lines on a terminal (bidi embeddings/overrides/isolates, LINE/PARAGRAPH SEPARATOR).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _show(m: re.Match[str]) -> str:
    ch = m.group(0)
    code = ord(ch)
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every control/escape character shown as printable text (one line stays one
    line: a newline inside becomes `^J`)."""
    return _UNSAFE.sub(_show, text)


def visible_lines(text: str) -> str:
    """Multi-line `text` with each line made `visible` (the line breaks themselves are kept)."""
    return "\n".join(visible(line) for line in text.split("\n"))


def has_control(text: str) -> bool:
    """True when `text` holds a character `visible` would rewrite (TAB counts too: a config value
    rendered into a file, a unit or an argv has no business holding one)."""
    return "\t" in text or _UNSAFE.search(text) is not None
