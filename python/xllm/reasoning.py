"""Reasoning ("thinking") text apart from the answer, for models whose template makes them think.

Such models write `<think>...</think>` before the answer (some templates open the block in the
prompt, so the output starts inside it). The splitter works on streamed text: a tag cut across
two pieces is held back until it is whole.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feeds text, returns (thinking, content) for each piece; `flush()` at the end."""

    def __init__(self, inside: bool = False) -> None:
        self._state = "thinking" if inside else "start"
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        held, self._held = self._held + text, ""
        if self._state == "start":
            stripped = held.lstrip()
            if stripped.startswith(OPEN):
                held, self._state = stripped[len(OPEN) :], "thinking"
            elif OPEN.startswith(stripped):
                self._held = held  # maybe the opening tag, not yet whole
                return "", ""
            else:
                self._state = "content"
        if self._state == "after":  # the blank lines between reasoning and answer go
            held = held.lstrip("\n")
            if not held:
                return "", ""
            self._state = "content"
        if self._state == "content":
            return "", held
        end = held.find(CLOSE)
        if end >= 0:
            self._state = "after"
            return held[:end], self.feed(held[end + len(CLOSE) :])[1]
        keep = partial_suffix(held, CLOSE)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], ""

    def whole(self, text: str) -> tuple[str, str]:
        """(thinking, content) of a whole answer."""
        thinking, content = self.feed(text)
        more_thinking, more_content = self.flush()
        return thinking + more_thinking, content + more_content

    def flush(self) -> tuple[str, str]:
        """What is held back when the text ends (an unfinished tag is text after all)."""
        held, self._held = self._held, ""
        return (held, "") if self._state == "thinking" else ("", held)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
