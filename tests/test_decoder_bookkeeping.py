"""The decoding loop's own bookkeeping: a constant number of host reads per step whatever the batch size, key
buffers that grow without copying every step, and the batched answer-slot tail; decoding results stay those of
the oracles in test_decoder.py / test_answer_slot.py."""

from dataclasses import replace

import pytest
import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder, _RowState
from latentprobe.model.host_syncs import HostSyncCounter
from latentprobe.model.protocol import LVR, MIRAGE, MONET

from decoding_helpers import make_instances, with_protocol

SIZES = [(56, 56), (84, 112), (112, 56), (56, 84)]


def _reads_per_step(decoder, batch, edits=None, repeats=1):
    """Host reads made by the decoder (not by the model, nor inside an edit's own ``edit_latent``) between
    consecutive forwards of the loop."""
    counter = HostSyncCounter()
    marks = []
    inner = decoder.inner_model

    def forward(**kwargs):
        with counter.paused():
            if bool((decoder.context.kinds != 2).any()):  # a loop step (the answer-slot tail feeds DONE rows)
                marks.append(counter.count)
            return inner(**kwargs)

    def paused(fn):
        def call(*args, **kwargs):
            with counter.paused():
                return fn(*args, **kwargs)
        return call

    for edit in {id(e): e for e in (edits or [])}.values():
        edit.edit_latent = paused(edit.edit_latent)
    decoder.forward_fn = forward
    try:
        prefill = decoder.prefill(batch)
        marks.clear()
        with counter:
            result = decoder.decode(prefill, edits, repeats=repeats)
    finally:
        decoder.forward_fn = None
    return [b - a for a, b in zip(marks, marks[1:])], result


@pytest.mark.parametrize("protocol, layout", [(LVR.with_steps(4), None), (MIRAGE, None),
                                              (MONET.with_steps(3), "inference"), (None, None)])
def test_a_step_reads_the_device_at_most_twice_whatever_the_batch(tiny_subject, tmp_path, protocol, layout):
    subject = with_protocol(tiny_subject, protocol, force_start=protocol is not None)
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=10, latent_layout=layout))
    per_batch = {}
    for n in (1, 4):
        deltas, result = _reads_per_step(decoder, subject.encode(make_instances(tmp_path, SIZES[:n])))
        assert len(deltas) >= 3
        if protocol is not None:
            assert any(row.n_latent_steps for row in result.rows)
        per_batch[n] = max(deltas)
    # one read of every row's mode and logits need per step, one of the rows feeding a latent (latent steps only)
    assert per_batch[1] <= 2 and per_batch[4] <= 2, per_batch


def test_a_sweep_of_edits_reads_the_device_at_most_twice_per_step(tiny_subject, tmp_path):
    from latentprobe.interventions import LatentConstant, LatentNoise, LatentStats, RowBinding

    subject = with_protocol(tiny_subject, LVR.with_steps(4), force_start=True)
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=10))
    batch = subject.encode(make_instances(tmp_path, SIZES[:1]))
    clean = decoder.run(batch).rows[0]
    binding = RowBinding(clean.instance_id, clean=clean.latent_vectors,
                         stats=LatentStats.from_vectors(clean.latent_vectors))
    edits = [LatentNoise(scale=1.0, seed=s).bind(binding) for s in range(3)] + [LatentConstant(value="zero").bind(binding)]
    deltas, result = _reads_per_step(decoder, batch, edits, repeats=len(edits))
    assert len(result.rows) == len(edits) and max(deltas) <= 2, deltas


def test_key_buffers_double_when_outgrown_and_keep_what_was_written():
    state = _RowState()
    state.length = 3
    state.sequences = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 0]])
    state.attention = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    state.kinds = torch.zeros((2, 4), dtype=torch.long)
    state.latent_mark = torch.tensor([[False, False, True, False]] * 2)
    state.latent_inputs = []
    state.append_inputs(torch.tensor([7, 8]), torch.tensor([1, 2]), None)  # fills the last free column
    assert state.attention.shape[1] == 4
    state.append_inputs(torch.tensor([9, 9]), torch.tensor([0, 0]), None)  # outgrown: doubled
    assert state.attention.shape[1] == 8 and state.length == 5
    assert state.sequences[:, :5].tolist() == [[1, 2, 3, 7, 9], [4, 5, 6, 8, 9]]
    assert state.attention[:, :5].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert state.latent_keys.tolist() == [[False, False, True, True, False], [False, False, True, False, False]]


def test_the_step_mask_is_the_concatenation_of_every_column_written(tiny_subject, tmp_path):
    """The key mask the loop passes at each step equals the padding mask plus one column per input fed so far,
    as the decoder built it by concatenation before it kept buffers."""
    subject = with_protocol(tiny_subject, MIRAGE, force_start=True)
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=8))
    batch = subject.encode(make_instances(tmp_path, SIZES[:3]))
    masks = []
    decoder.forward_fn = lambda **kw: (masks.append(kw["attention_mask"].clone()), decoder.inner_model(**kw))[1]
    try:
        result = decoder.run(batch)
    finally:
        decoder.forward_fn = None
    length = result.prompt_length
    steps = [m for m in masks[1:] if m.shape[1] > length][: result.sequences.shape[1] - length - 1]
    for t, mask in enumerate(steps):
        expected = torch.cat([batch.attention_mask, (result.input_kinds[:, length:length + t + 1] != 2).long()], 1)
        assert torch.equal(mask.cpu(), expected)


def test_the_forced_answer_slot_runs_as_batched_one_token_steps(tiny_subject, tmp_path):
    """Every row's forced prefix is fed in len(prefix) + 1 one-token forwards of the whole batch (after a budget
    stop the unfed last token comes first), whatever the batch size, and the cache is cropped back after."""
    subject = replace(with_protocol(tiny_subject, LVR.with_steps(2), force_start=True), answer_prefix="\\boxed{")
    prefix = subject.tokenizer.encode("\\boxed{", add_special_tokens=False)
    widths = {}
    for n in (1, 4):
        decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=6))
        shapes = []
        decoder.forward_fn = lambda **kw: (shapes.append(kw["inputs_embeds"].shape[:2]
                                                         if "inputs_embeds" in kw and kw.get("input_ids") is None
                                                         else None), decoder.inner_model(**kw))[1]
        result = decoder.run(subject.encode(make_instances(tmp_path, SIZES[:n])))
        forced = [row for row in result.rows if row.answer_slot == "forced"]
        assert forced and all(row.answer_logits is not None for row in forced)
        loop_steps = max(len(row.generated_ids) for row in result.rows) - 1
        tail = shapes[1 + loop_steps:]
        assert all(shape == (n, 1) for shape in tail)
        widths[n] = len(tail)
        assert decoder.last_cache.get_seq_length() == result.prompt_length + loop_steps
    assert widths[1] == widths[4] <= len(prefix) + 1
