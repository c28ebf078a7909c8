"""Generated token ids to streamed text, cut at OpenAI `stop` sequences."""
from __future__ import annotations


class Detokenizer:
    """Turns one generation's new token ids into text pieces, as they come.

    Each id is decoded with the few ids before it (text-generation-inference's offsets), so a
    piece costs O(1) decodes and the pieces join to `tokenizer.decode(ids, skip_special_tokens=True)`;
    an id that ends inside a UTF-8 character waits for the rest. Text that could still be the
    start of a `stop` sequence is held back; once a stop sequence appears, the text ends before
    it (OpenAI leaves the stop sequence out) and `stopped` is set.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer, self._stop = tokenizer, stop
        self.tokens = 0  # ids read, up to the one that completed a stop sequence
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read] were decoded last; ids[read:] not yet
        self._text, self._sent = "", 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that `token` makes safe to send (often "")."""
        self.tokens += 1
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        if not self.stopped and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix:self._read])
            self._text += self._decode(self._ids[self._prefix:])[len(before):]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self._stop if (i := self._text.find(s, self._sent)) >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self._text)
        else:  # hold back the longest tail that begins a stop sequence
            tail = self._text[self._sent:]
            held = max((k for s in self._stop for k in range(1, min(len(s), len(tail) + 1))
                        if tail.endswith(s[:k])), default=0)
            end = len(self._text) - held
        piece, self._sent = self._text[self._sent:end], end
        return piece
