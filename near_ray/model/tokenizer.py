"""open_clip's BPE tokenizer restricted to a fixed subset of its tokens, for small text towers.

A model config may name the BPE tokens its text tower knows (``"tokenizer": {"bpe_subset": [ids]}``);
its token embedding then has one row per kept token instead of 49,408. Any text still tokenizes: a
BPE token outside the subset is spelled out in its byte tokens, which are always kept, so nothing is
ever unknown, only less compact. Kept ids are renumbered in their original order, which keeps
end-of-text the highest id: CLIP's text tower pools at the argmax token.
"""

from __future__ import annotations

from typing import Any

BYTE_TOKENS = 512  # open_clip's vocabulary starts with the 256 byte symbols and the same with "</w>"


class SubsetTokenizer:
    """Call it like ``open_clip.SimpleTokenizer``: texts -> LongTensor [N, context_length]."""

    def __init__(self, tokens: list[int], context_length: int) -> None:
        import open_clip

        self.base = open_clip.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        special = {self.base.sot_token_id, self.base.eot_token_id}
        self.kept = sorted(set(tokens) | set(range(BYTE_TOKENS)) | special)
        self.index = {t: i for i, t in enumerate(self.kept)}
        self.sot_token_id = self.index[self.base.sot_token_id]
        self.eot_token_id = self.index[self.base.eot_token_id]
        self.vocab_size = len(self.kept)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for token in self.base.encode(text):
            if token in self.index:
                out.append(self.index[token])
            else:
                out.extend(self._spelled(token))
        return out

    def _spelled(self, token: int) -> list[int]:
        symbol = self.base.decoder[token]
        if symbol.endswith("</w>"):
            chars = list(symbol[: -len("</w>")])
            pieces = chars[:-1] + [chars[-1] + "</w>"]
        else:
            pieces = list(symbol)
        return [self.index[self.base.encoder[p]] for p in pieces]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Any:
        import torch

        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:  # open_clip's truncation: keep the end-of-text token last
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


def bpe_subset(texts: list[str], minimum_count: int = 1) -> list[int]:
    """The BPE tokens of ``texts`` seen at least ``minimum_count`` times (what a subset tokenizer keeps)."""
    import open_clip

    base = open_clip.SimpleTokenizer()
    counts: dict[int, int] = {}
    for text in texts:
        for t in base.encode(text):
            counts[t] = counts.get(t, 0) + 1
    return sorted(t for t, c in counts.items() if c >= minimum_count)
