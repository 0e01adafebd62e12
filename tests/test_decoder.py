"""The latent decoder against independent oracles: transformers' generate, a full recompute without cache,
get_rope_index over the full sequence, and the same instance decoded alone."""

from dataclasses import replace

import torch

from latentprobe.decoding import LATENT, DecodeConfig, LatentDecoder, replay
from latentprobe.protocol import LVR, MIRAGE, MONET

from decoding_helpers import ScriptedDecoder, make_instances, with_protocol

SIZES = [(56, 56), (84, 112), (112, 56), (56, 84)]


def test_no_latent_mode_matches_generate(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, None, force_start=False)
    batch = subject.encode(make_instances(tmp_path, SIZES))
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=10)).run(batch)
    reference = subject.model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, max_new_tokens=10,
        do_sample=False, eos_token_id=subject.eos_token_ids, pad_token_id=subject.pad_token_id)
    generated = reference[:, batch.input_ids.shape[1]:]
    for r, row in enumerate(result.rows):
        assert not row.entered_latent
        ids = row.generated_ids
        assert generated[r, : len(ids)].tolist() == ids


def _latent_batch(tiny_subject, tmp_path, protocol, script):
    subject = with_protocol(tiny_subject, protocol, force_start=False)
    batch = subject.encode(make_instances(tmp_path, SIZES))
    decoder = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=14), script)
    return subject, batch, decoder.run(batch)


def test_cached_latent_decoding_equals_full_recompute(tiny_subject, tmp_path):
    start = tiny_subject.resolved_protocol.start_id
    # rows open latent mode at generated offsets 0, 2, 5 and never
    script = {(0, 0): start, (1, 2): start, (2, 5): start}
    subject, batch, result = _latent_batch(tiny_subject, tmp_path, LVR, script)
    assert [row.latent_start for row in result.rows] == [1, 3, 6, None]
    assert [row.n_latent_steps for row in result.rows] == [4, 4, 4, 0]
    hidden = replay(subject, batch, result)
    logits = subject.model.lm_head(hidden)
    prompt_len = result.prompt_length
    for r, row in enumerate(result.rows):
        for j, token in enumerate(row.generated_ids):
            p = prompt_len + j  # position holding generated token j; it was predicted at p - 1
            if row.step_kinds[j] == LATENT:
                torch.testing.assert_close(result.latent_inputs[r, p], hidden[r, p - 1], atol=1e-4, rtol=1e-4)
            elif (r, j) not in script and (j == 0 or row.step_kinds[j - 1] != LATENT or token != LVR_END(subject)):
                assert int(logits[r, p - 1].argmax()) == token, (r, j)
    # the recorded latent vectors are the ones in the sequence
    for r, row in enumerate(result.rows):
        positions = [prompt_len + j for j, k in enumerate(row.step_kinds) if k == LATENT]
        if positions:
            torch.testing.assert_close(row.latent_vectors, result.latent_inputs[r, positions])


def LVR_END(subject):
    return subject.tokenizer.convert_tokens_to_ids(LVR.end_token)


def test_positions_equal_get_rope_index_over_full_sequence(tiny_subject, tmp_path):
    start = tiny_subject.resolved_protocol.start_id
    subject, batch, result = _latent_batch(tiny_subject, tmp_path, LVR, {(0, 1): start, (2, 3): start})
    mm = torch.zeros_like(result.sequences)
    mm[:, : batch.mm_token_type_ids.shape[1]] = batch.mm_token_type_ids
    expected, _ = subject.model.model.get_rope_index(result.sequences, mm_token_type_ids=mm,
                                                     image_grid_thw=batch.image_grid_thw,
                                                     attention_mask=result.attention_mask)
    ran = result.attention_mask.bool()
    assert torch.equal(result.position_ids[:, ran], expected[:, ran])


def test_each_row_equals_the_instance_decoded_alone(tiny_subject, tmp_path):
    subject = tiny_subject  # forced latent start, fixed 4 steps
    instances = make_instances(tmp_path, SIZES)
    config = DecodeConfig(max_new_tokens=12)
    together = LatentDecoder(subject, config).run(subject.encode(instances))
    for r, inst in enumerate(instances):
        alone = LatentDecoder(subject, config).run(subject.encode([inst])).rows[0]
        row = together.rows[r]
        assert row.generated_ids == alone.generated_ids
        torch.testing.assert_close(row.latent_vectors, alone.latent_vectors, atol=1e-5, rtol=1e-4)


def test_sampling_is_seeded_and_batch_independent(tiny_subject, tmp_path):
    instances = make_instances(tmp_path, SIZES[:3])
    config = DecodeConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = LatentDecoder(tiny_subject, config).run(tiny_subject.encode(instances))
    b = LatentDecoder(tiny_subject, config).run(tiny_subject.encode(instances[::-1]))
    assert [r.generated_ids for r in a.rows] == [r.generated_ids for r in b.rows][::-1]
    other = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=8))
    c = other.run(tiny_subject.encode(instances))
    assert [r.generated_ids for r in a.rows] != [r.generated_ids for r in c.rows]


def test_fixed_rule_runs_exactly_k_steps_then_forces_end(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, replace(LVR, exit_rule="force_end").with_steps(6), force_start=True)
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=12)).run(
        subject.encode(make_instances(tmp_path, SIZES[:2])))
    end, pad = subject.resolved_protocol.end_id, subject.resolved_protocol.pad_id
    for row in result.rows:
        assert row.forced_start and row.n_latent_steps == 6 and row.latent_segments == [(0, 6)]
        assert row.generated_ids[:7] == [pad] * 6 + [end]


def test_end_token_rule_stops_when_the_model_emits_end(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, MIRAGE, force_start=True)
    end = subject.resolved_protocol.end_id
    # row 0 chooses end after 2 latent steps, row 1 after 0; row 2 never and hits the cap of 8
    script = {(0, 2): end, (1, 0): end}
    decoder = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=14), script)
    result = decoder.run(subject.encode(make_instances(tmp_path, SIZES[:3])))
    steps = [row.n_latent_steps for row in result.rows]
    assert steps[0] == 2 and steps[1] == 0 and steps[2] == MIRAGE.num_steps
    for row in result.rows:
        n = row.n_latent_steps
        assert row.generated_ids[n] == end


def test_monet_keeps_the_models_ids_at_latent_steps(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, MONET.with_steps(3), force_start=True)
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=10)).run(
        subject.encode(make_instances(tmp_path, SIZES[:1])))
    row = result.rows[0]
    pad = subject.resolved_protocol.pad_id
    latent_ids = [t for t, k in zip(row.generated_ids, row.step_kinds) if k == LATENT]
    assert latent_ids and all(t != pad for t in latent_ids)


def test_latent_mode_skips_the_lm_head_when_the_rule_needs_no_logits(tiny_subject, tmp_path):
    forced_end = with_protocol(tiny_subject, replace(LVR, exit_rule="force_end"), force_start=True)
    own_exit = with_protocol(tiny_subject, LVR, force_start=True)  # LVR's exit: the model's own choice
    counts = {}
    for name, subject in (("forced", forced_end), ("own", own_exit)):
        calls = []
        handle = subject.model.lm_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        try:
            LatentDecoder(subject, DecodeConfig(max_new_tokens=6)).run(
                subject.encode(make_instances(tmp_path, SIZES[:2])))
        finally:
            handle.remove()
        counts[name] = calls
    # 6 generated positions: 4 latent pads and the forced end need no head; only the last text token does (then
    # the answer slot is read once per row: the end token was found, its logged state goes through the head)
    assert counts["forced"] == [2, 2]
    # the model's own exit needs the head once more, after the last latent step
    assert counts["own"][:2] == [2, 2]


def test_zeroed_latents_replay_as_latents(tiny_subject, tmp_path):
    """A latent set to the zero vector is still a latent input: the no-cache reference must feed zeros there."""
    from latentprobe.interventions import LatentZero, RowBinding

    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:2]))
    zero = LatentZero()
    edits = [zero.bind(RowBinding(iid)) for iid in batch.instance_ids]
    result = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=10)).run(batch, edits)
    assert all(row.n_latent_steps == 4 and not row.latent_vectors.any() for row in result.rows)
    hidden = replay(tiny_subject, batch, result)
    logits = tiny_subject.model.lm_head(hidden)
    end = tiny_subject.resolved_protocol.end_id
    for r, row in enumerate(result.rows):
        for j, token in enumerate(row.generated_ids):
            if row.step_kinds[j] != LATENT and token != end:  # the forced end token is not the model's choice
                assert int(logits[r, result.prompt_length + j - 1].argmax()) == token, (r, j)


def test_repeated_batch_equals_encoding_the_repeated_instances(tiny_subject, tmp_path):
    from latentprobe.data import Instance

    one, two = make_instances(tmp_path, [(56, 56), (84, 112)])
    rows = [one, Instance(id="text-only", question="q", answer="a"),
            Instance(id="pair", question="q", answer="a", images=one.images + two.images)]
    repeated = tiny_subject.encode(rows).repeat(3)
    expected = tiny_subject.encode([inst for inst in rows for _ in range(3)])
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(repeated, name), getattr(expected, name)), name
    assert repeated.image_counts == expected.image_counts == [1, 1, 1, 0, 0, 0, 2, 2, 2]
