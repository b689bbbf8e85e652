"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character."""

from __future__ import annotations

from jaxinfer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; get back the new text each one completes.

    Byte-level BPE tokens can end inside a multi-byte character; such bytes decode to U+FFFD.
    The text of a window of recent tokens is decoded and held back while it ends in U+FFFD, so
    the concatenated deltas equal ``tokenizer.decode(all_ids)`` and never contain a broken char.
    Decoding restarts from a short window, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the window that is decoded again
        self._read_offset = 0  # tokens before this index have been emitted

    def __getstate__(self) -> dict:
        """Pickled without the tokenizer (a request moving to another process): ``bind`` one there."""
        return {**self.__dict__, "tokenizer": None}

    def bind(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # an incomplete character (or nothing visible) so far
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full_text[len(prefix_text):]
