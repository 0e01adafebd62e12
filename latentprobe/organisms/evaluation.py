"""Held-out accuracy of an organism as latentprobe itself measures it: `LatentDecoder` + the subject's parser."""

from __future__ import annotations

from typing import Any, Sequence

from ..data.instances import Instance, load_images
from ..model.decoding import DecodeConfig, LatentDecoder
from ..runs.common import row_record


def decode_records(subject, instances: Sequence[Instance], batch_size: int = 50,
                   config: DecodeConfig | None = None) -> list[dict[str, Any]]:
    """Greedy-decode ``instances`` and return one index record per instance (as traces store them)."""
    decoder = LatentDecoder(subject, config or DecodeConfig(max_new_tokens=subject.max_new_tokens))
    records = []
    for start in range(0, len(instances), batch_size):
        part = list(instances[start:start + batch_size])
        result = decoder.run(subject.encode(part, images=[load_images(inst) for inst in part]))
        records += [row_record(subject, inst, row) for inst, row in zip(part, result.rows)]
    return records


def decoder_accuracy(subject, instances: Sequence[Instance], batch_size: int = 50) -> dict[str, Any]:
    """``test_accuracy`` and the share of rows that entered latent mode / ended as trained."""
    records = decode_records(subject, instances, batch_size=batch_size)
    n = len(records)
    out = {"test_accuracy": sum(r["correct"] for r in records) / n, "n_decoded": n,
           "unparsable_rate": sum(r["answer_status"] == "unparsable" for r in records) / n}
    if subject.protocol is not None:
        out["entered_latent_rate"] = sum(r["entered_latent"] for r in records) / n
        out["mean_latent_steps"] = sum(r["n_latent_steps"] for r in records) / n
    if subject.mediator == "text":
        out["mediator_rate"] = sum(bool(r["mediator_text"]) for r in records) / n
    return out
