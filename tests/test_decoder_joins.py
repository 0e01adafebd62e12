"""Rows that join a decode late (`LatentDecoder.decode(..., join_steps=...)`): a row promised to be the unedited run
until latent step k is run only from there, as a copy of an unedited trunk row. Against the same decode with every
row run from the start: latent edits at step k, patching grids (recompute and pin), the inference layout, trunks
that stop before the join step and seeded sampling give the same ids, and the same vectors and logits to float
rounding (a row's matrix products are summed in another order when the batch around it has another size, as for
any change of batch: `test_decoder.py::test_each_row_equals_the_instance_decoded_alone`); what cannot join late
is refused in one line."""

import numpy as np
import pytest
import torch

from latentprobe.data import load_images
from latentprobe.errors import LatentProbeError
from latentprobe.interventions import LatentDrop, LatentNoise, LatentStats, RowBinding
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.model.protocol import MONET
from latentprobe.model.recording import Recorder, RecordSpec
from latentprobe.where.patching import reference_run, resolve_grid, run_cells

from decoding_helpers import make_instances, with_protocol

SIZES = [(56, 56), (84, 112), (112, 56)]


def _equal_results(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.position_ids, b.position_ids)
    assert torch.equal(a.input_kinds, b.input_kinds)
    torch.testing.assert_close(a.latent_inputs, b.latent_inputs, atol=1e-5, rtol=1e-4)
    for x, y in zip(a.rows, b.rows, strict=True):
        assert x.instance_id == y.instance_id
        assert x.generated_ids == y.generated_ids and x.stop_reason == y.stop_reason
        assert x.latent_segments == y.latent_segments and x.answer_slot == y.answer_slot
        torch.testing.assert_close(x.latent_vectors, y.latent_vectors, atol=1e-5, rtol=1e-4)
        assert (x.answer_logits is None) == (y.answer_logits is None)
        if x.answer_logits is not None:
            torch.testing.assert_close(x.answer_logits, y.answer_logits, atol=1e-4, rtol=1e-4)


def _noise_sweep(subject, batch, config, steps=(0, 1, 2, 3)):
    """One noise edit per latent step (recompute), rows b*M + c editing step steps[c]: join step = steps[c]."""
    clean = LatentDecoder(subject, config).run(batch)
    stats = LatentStats.from_vectors(torch.cat([r.latent_vectors for r in clean.rows]))
    edits, joins = [], []
    for row in clean.rows:
        for k in steps:
            iv = LatentNoise(scale=3.0, steps=[k], semantics="recompute", seed=k)
            edits.append(iv.bind(RowBinding(row.instance_id, clean=row.latent_vectors, stats=stats)))
            joins.append(k)
    return edits, joins


@pytest.mark.parametrize("kv_cache", ["preallocated", "dynamic"])
def test_latent_edits_joining_at_their_step_equal_rows_run_from_the_start(tiny_subject, tmp_path, kv_cache):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES))
    config = DecodeConfig(max_new_tokens=12)
    edits, joins = _noise_sweep(tiny_subject, batch, config)
    decoder = LatentDecoder(tiny_subject, config, kv_cache=kv_cache)
    prefill = decoder.prefill(batch)
    full = decoder.decode(prefill, edits, repeats=4)
    late = decoder.decode(prefill, edits, repeats=4, join_steps=joins)
    _equal_results(full, late)
    assert len({tuple(r.generated_ids) for r in late.rows}) > 3  # the edits did change the runs


def test_the_inference_layout_and_a_trunk_that_stops_early(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, MONET.with_steps(4), force_start=True)  # inference layout, forced start
    batch = subject.encode(make_instances(tmp_path, SIZES[:2]))
    for budget in (12, 3):  # 3: every row stops inside its latent phase, before the later join steps
        config = DecodeConfig(max_new_tokens=budget)
        edits, joins = _noise_sweep(subject, batch, config)
        decoder = LatentDecoder(subject, config)
        prefill = decoder.prefill(batch)
        _equal_results(decoder.decode(prefill, edits, repeats=4),
                       decoder.decode(prefill, edits, repeats=4, join_steps=joins))


def test_sampling_with_one_stream_joins_with_the_trunks_draws(tiny_subject, tmp_path):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:2]))
    config = DecodeConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=5)
    edits, joins = _noise_sweep(tiny_subject, batch, config)
    decoder = LatentDecoder(tiny_subject, config)
    prefill = decoder.prefill(batch)
    _equal_results(decoder.decode(prefill, edits, repeats=4, streams=[0] * 4),
                   decoder.decode(prefill, edits, repeats=4, streams=[0] * 4, join_steps=joins))
    with pytest.raises(LatentProbeError, match="streams"):
        decoder.decode(prefill, edits, repeats=4, join_steps=joins)


@pytest.mark.parametrize("semantics", ["recompute", "pin"])
def test_a_patching_grid_with_late_joins_equals_every_cell_run_from_the_start(tiny_subject, tmp_path, semantics):
    instances = make_instances(tmp_path, SIZES)
    images = [load_images(i) for i in instances]
    decoder = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=12))
    grid = resolve_grid(tiny_subject)
    clean = reference_run(decoder, tiny_subject.encode(instances, images=images), grid, None)
    corrupt = reference_run(decoder, tiny_subject.encode(instances, images=images[1:] + images[:1]), grid, None)
    full = run_cells(decoder, tiny_subject, instances, grid, corrupt, clean, None, semantics, 4096, join_late=False)
    late = run_cells(decoder, tiny_subject, instances, grid, corrupt, clean, None, semantics, 4096, join_late=True)
    assert list(full) == list(late)
    for site in full:
        for (probs_a, logodds_a), (probs_b, logodds_b) in zip(full[site], late[site], strict=True):
            assert (probs_a is None) == (probs_b is None)
            if probs_a is not None:
                np.testing.assert_allclose(probs_a, probs_b, atol=1e-6)
                np.testing.assert_allclose(logodds_a, logodds_b, atol=1e-4)


def test_what_cannot_join_late_is_refused(tiny_subject, tmp_path):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:1]))
    decoder = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=8))
    prefill = decoder.prefill(batch)
    with pytest.raises(LatentProbeError, match="join steps given"):
        decoder.decode(prefill, repeats=2, join_steps=[0, 1, 2])
    with pytest.raises(LatentProbeError, match="whole number"):
        decoder.decode(prefill, repeats=2, join_steps=[0, -1])
    drop = LatentDrop(keep=1).bind(RowBinding("x", clean=torch.zeros(4, tiny_subject.hidden_size)))
    with pytest.raises(LatentProbeError, match="changes the latent phase"):
        decoder.decode(prefill, [None, drop], repeats=2, join_steps=[0, 2])
    with Recorder(decoder, RecordSpec(layers="final")):
        with pytest.raises(LatentProbeError, match="on_reindex"):
            decoder.decode(prefill, repeats=2, join_steps=[0, 2])
    # all zero: the ordinary decode
    _equal_results(decoder.decode(prefill, repeats=2), decoder.decode(prefill, repeats=2, join_steps=[0, 0]))


@pytest.mark.parametrize("max_rows", [4096, 9])
def test_the_corrupted_run_decoded_as_the_cells_trunk_equals_its_own_reference_run(tiny_subject, tmp_path, max_rows):
    """`reference_with_cells`: the run being patched, decoded as the trunk of its denoising cells, gives the states,
    masks and outcomes of `reference_run`, and its cells those of `run_cells` (in passes of ``max_rows``)."""
    from latentprobe.where.patching import can_share_reference, reference_with_cells

    instances = make_instances(tmp_path, SIZES)
    images = [load_images(i) for i in instances]
    decoder = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=12))
    grid = resolve_grid(tiny_subject)
    assert can_share_reference(decoder, grid, "recompute") and not can_share_reference(decoder, grid, "pin")
    corrupt_batch = tiny_subject.encode(instances, images=images[1:] + images[:1])
    clean = reference_run(decoder, tiny_subject.encode(instances, images=images), grid, None)
    alone = reference_run(decoder, corrupt_batch, grid, None)
    shared, done = reference_with_cells(decoder, tiny_subject, instances, grid, corrupt_batch, clean, None, max_rows)
    assert [r.generated_ids for r in shared.result.rows] == [r.generated_ids for r in alone.result.rows]
    for name in ("latent", "answer"):
        torch.testing.assert_close(getattr(shared, name), getattr(alone, name), atol=1e-5, rtol=1e-4)
    for name in ("latent_count", "answer_count"):
        assert torch.equal(getattr(shared, name), getattr(alone, name))
    for layer, states in alone.prompt.items():
        assert torch.equal(shared.prompt[layer], states)
    assert all(torch.equal(a, b) for a, b in zip(shared.step_attention, alone.step_attention, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(shared.step_positions, alone.step_positions, strict=True))
    expected = run_cells(decoder, tiny_subject, instances, grid, alone, clean, None, "recompute", max_rows)
    got = run_cells(decoder, tiny_subject, instances, grid, shared, clean, None, "recompute", max_rows, done=done)
    assert list(got) == list(expected) and 0 < len(done) < len(expected)
    for site in expected:
        for (probs_a, _), (probs_b, _) in zip(expected[site], got[site], strict=True):
            assert (probs_a is None) == (probs_b is None)
            if probs_a is not None:
                np.testing.assert_allclose(probs_a, probs_b, atol=1e-6)


def test_keep_trunks_returns_the_unedited_run_after_the_rows(tiny_subject, tmp_path):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:2]))
    config = DecodeConfig(max_new_tokens=10)
    edits, joins = _noise_sweep(tiny_subject, batch, config)
    decoder = LatentDecoder(tiny_subject, config)
    prefill = decoder.prefill(batch)
    kept = decoder.decode(prefill, edits, repeats=4, join_steps=joins, keep_trunks=True)
    assert len(kept.rows) == 2 * 4 + 2
    plain = decoder.decode(prefill)
    for row, trunk in zip(plain.rows, kept.rows[-2:], strict=True):
        assert row.generated_ids == trunk.generated_ids and row.instance_id == trunk.instance_id
        torch.testing.assert_close(row.latent_vectors, trunk.latent_vectors, atol=1e-5, rtol=1e-4)
    with pytest.raises(LatentProbeError, match="keep_trunks"):
        decoder.decode(prefill, edits, repeats=4, join_steps=[0] * 4 + joins[4:], keep_trunks=True)
