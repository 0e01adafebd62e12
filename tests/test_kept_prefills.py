"""Issue 24, "one clean pass, shared": an intervention run's edits decode from the clean pass's own prefill (the
prompt is prefilled once per instance), with the same records as prefilling it again; its clean pass can keep every
image token while its edits keep their mean."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from latentprobe.data import builtin_instances
from latentprobe.interventions import make_interventions
from latentprobe.runs import kept_prefills
from latentprobe.runs.intervene import intervene
from latentprobe.runs.store import TraceStore
from latentprobe.study.counting import DecodeCounter

N = 5  # two batches of 3 and 2: the last batch differs in size, so a kept prefill must match its own batch


def _edits():
    return make_interventions("latent", ["noise", "patch"], scales=[3.0]) + make_interventions("input", ["image-swap"])


def _run(subject, out, budget=None, monkeypatch=None, **kwargs):
    if budget is not None:
        monkeypatch.setattr(kept_prefills, "KEPT_PREFILL_BYTES", budget)
    with DecodeCounter() as counts:
        intervene(subject, builtin_instances(N), _edits(), out, batch_size=3, n_boot=50,
                  mediators=("fed_back", "all_layers"), **kwargs)
    return counts


def _tensors(run_dir) -> dict[tuple[str, str, str], torch.Tensor]:
    store = TraceStore(run_dir)
    frame = store.index()
    out = {}
    for row in frame.itertuples():
        for name in store.record_tensors(row.record_id).keys():
            out[(row.instance_id, row.intervention, name)] = store.tensor(row.record_id, name)
    return out


def test_edits_from_the_kept_clean_prefill_equal_edits_from_a_new_prefill(tiny_subject, tmp_path, monkeypatch):
    kept = _run(tiny_subject, tmp_path / "kept")
    fresh = _run(tiny_subject, tmp_path / "fresh", budget=0, monkeypatch=monkeypatch)  # nothing fits: prefill again
    # one prompt prefill per instance saved: the latent edits and the mediation runs from the clean prompt reuse it
    assert fresh.prefill_rows - kept.prefill_rows == N
    assert fresh.decode_rows == kept.decode_rows
    a, b = _tensors(tmp_path / "kept"), _tensors(tmp_path / "fresh")
    assert sorted(a) == sorted(b)
    for key in a:  # bit for bit: the same prompt cache, the same Recorder captures
        assert torch.equal(a[key], b[key]), key
    rows = [pd.read_parquet(d / "effects_rows.parquet").drop(columns=["run_seconds"], errors="ignore")
            for d in (tmp_path / "kept", tmp_path / "fresh")]
    pd.testing.assert_frame_equal(rows[0], rows[1])


def test_the_budget_bounds_what_is_kept(tiny_subject):
    from latentprobe.model.decoding import LatentDecoder

    decoder = LatentDecoder(tiny_subject)
    prefill = decoder.prefill(tiny_subject.encode(builtin_instances(2)))
    size = kept_prefills.prefill_nbytes(prefill)
    assert 0 < size < 2**40
    store = kept_prefills.KeptPrefills(budget=size + size // 2)  # room for one
    assert store.keep(["a", "b"], prefill, {}) and not store.keep(["c", "d"], prefill, {})
    assert store.take(["b", "a"]) is None and store.take(["a", "b"]).prefill is prefill and store.reused == 1
    assert store.nbytes == 0


def test_at_most_kept_prefill_batches_are_kept_so_memory_is_flat_in_instances(tiny_subject, tmp_path, monkeypatch):
    # 7 batches of one instance: only the first KEPT_PREFILL_BATCHES save their prefill, the rest prefill again
    monkeypatch.setattr(kept_prefills, "KEPT_PREFILL_BATCHES", 2)
    with DecodeCounter() as kept:
        intervene(tiny_subject, builtin_instances(7), _edits(), tmp_path / "capped", batch_size=1, n_boot=20)
    monkeypatch.setattr(kept_prefills, "KEPT_PREFILL_BYTES", 0)
    with DecodeCounter() as fresh:
        intervene(tiny_subject, builtin_instances(7), _edits(), tmp_path / "none", batch_size=1, n_boot=20)
    assert fresh.prefill_rows - kept.prefill_rows == 2
    store = kept_prefills.KeptPrefills(budget=2**40, max_batches=1)
    assert store.keep(["a"], _FakePrefill(), {}) and not store.keep(["b"], _FakePrefill(), {})


class _FakePrefill:
    """A prefill with no tensors (0 bytes): only the batch count can refuse it."""

    class cache:  # noqa: N801
        layers = ()

    batch = None
    hidden = position_ids = start_pending = None


@pytest.mark.parametrize("image_states", ["all", "mean"])
def test_the_clean_pass_keeps_every_image_token_when_asked_and_the_edits_their_mean(tiny_subject, tmp_path,
                                                                                    image_states):
    intervene(tiny_subject, builtin_instances(3), make_interventions("latent", ["noise"], scales=[3.0]),
              tmp_path / "iv", batch_size=3, n_boot=20, clean_image_states=image_states)
    store = TraceStore(tmp_path / "iv")
    frame = store.index()
    for row in frame.itertuples():
        names = set(store.record_tensors(row.record_id).keys())
        assert "image_mean" in names
        assert ("image_tokens" in names) == (row.intervention == "clean" and image_states == "all"), row.intervention
    assert store.manifest["record"].get("clean_image", "mean") == image_states
    # another setting cannot resume this folder (its clean rows would hold other tensors)
    from latentprobe.errors import LatentProbeError

    other = "mean" if image_states == "all" else "all"
    with pytest.raises(LatentProbeError, match="cannot resume"):
        intervene(tiny_subject, builtin_instances(3), make_interventions("latent", ["noise"], scales=[3.0]),
                  tmp_path / "iv", batch_size=3, n_boot=20, clean_image_states=other, resume=True)
