"""Counting decodes: how many prompt rows a piece of work prefilled and how many rows it decoded.

A study's saving is in decodes, not only in seconds (seconds depend on the machine and its load): `DecodeCounter`
counts every `LatentDecoder.prefill` row and every row `LatentDecoder.decode` runs (a sweep of M edits decoded
side by side from one prefill counts M rows), whoever calls them.

>>> with DecodeCounter() as counts:
...     pass
>>> counts.prefill_rows, counts.decode_rows
(0, 0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecodeCounter:
    """Context manager counting prefilled and decoded rows of every `LatentDecoder` while it is open."""

    prefill_rows: int = 0
    decode_rows: int = 0
    prefills: int = 0
    decodes: int = 0

    def __enter__(self) -> "DecodeCounter":
        from ..model.decoding import LatentDecoder

        self._saved = (LatentDecoder.prefill, LatentDecoder.decode)
        original_prefill, original_decode = self._saved
        counter = self

        def prefill(decoder, batch, *args, **kwargs):
            result = original_prefill(decoder, batch, *args, **kwargs)
            counter.prefills += 1
            counter.prefill_rows += int(result.batch.batch_size)
            return result

        def decode(decoder, prefill_, edits=None, *args, repeats: int = 1, **kwargs):
            result = original_decode(decoder, prefill_, edits, *args, repeats=repeats, **kwargs)
            counter.decodes += 1
            counter.decode_rows += len(result.rows)
            return result

        LatentDecoder.prefill, LatentDecoder.decode = prefill, decode
        return self

    def __exit__(self, *exc):
        from ..model.decoding import LatentDecoder

        LatentDecoder.prefill, LatentDecoder.decode = self._saved
        return False

    def as_dict(self) -> dict[str, int]:
        return {"prefill_rows": self.prefill_rows, "decode_rows": self.decode_rows, "prefills": self.prefills,
                "decodes": self.decodes}
