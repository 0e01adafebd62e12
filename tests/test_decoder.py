"""The latent decoder against independent oracles: transformers' generate, a full recompute without cache,
get_rope_index over the full sequence, and the same instance decoded alone."""

from dataclasses import replace

import pytest
import torch

from latentprobe.model.decoding import LATENT, DecodeConfig, LatentDecoder, replay
from latentprobe.model.protocol import LVR, MIRAGE, MONET

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


# -- layouts, exits and edge cases ------------------------------------------------------------------------------
def _replay_check(subject, batch, result, script=()):
    """Every fed latent is the final-norm state of the position before it, and every text token the decoder
    chose itself is the argmax of a full recompute (the no-cache reference)."""
    hidden = replay(subject, batch, result)
    logits = subject.model.lm_head(hidden)
    proto = subject.resolved_protocol
    for r, row in enumerate(result.rows):
        for j, token in enumerate(row.generated_ids):
            p = result.prompt_length + j
            if row.step_kinds[j] == LATENT:
                torch.testing.assert_close(result.latent_inputs[r, p], hidden[r, p - 1], atol=1e-4, rtol=1e-4)
            elif (r, j) not in script and not (proto is not None and token == proto.end_id):
                assert int(logits[r, p - 1].argmax()) == token, (r, j)
    return hidden


def test_monet_layouts_against_the_no_cache_reference(tiny_subject, tmp_path):
    """Inference layout (Monet's vLLM runner): the start token's position is latent step 0 and z_0 is the state
    that chose the start token. Training layout: the start token is fed; step 0 is the next position, z_0 =
    h(start)."""
    start = tiny_subject.tokenizer.convert_tokens_to_ids(MONET.start_token)
    script = {(0, 1): start, (1, 3): start}
    starts = {}
    for layout in ("inference", "training"):
        subject = with_protocol(tiny_subject, MONET.with_steps(3).with_layout(layout), force_start=False)
        batch = subject.encode(make_instances(tmp_path, SIZES[:3]))
        decoder = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=12), script)
        assert decoder.latent_layout == layout
        result = decoder.run(batch)
        hidden = _replay_check(subject, batch, result, script)
        for r, chosen_at in ((0, 1), (1, 3)):
            row = result.rows[r]
            assert row.generated_ids[chosen_at] == start
            p_start = result.prompt_length + chosen_at
            if layout == "inference":  # the start's own position holds z_0 = the state that chose it
                assert row.step_kinds[chosen_at] == LATENT and row.latent_start == chosen_at
                torch.testing.assert_close(row.latent_vectors[0], hidden[r, p_start - 1], atol=1e-4, rtol=1e-4)
            else:  # the start token is fed as text; z_0 = h(start) at the next position
                assert row.step_kinds[chosen_at] != LATENT and row.latent_start == chosen_at + 1
                torch.testing.assert_close(row.latent_vectors[0], hidden[r, p_start], atol=1e-4, rtol=1e-4)
            assert 1 <= row.n_latent_steps <= 3  # the cap counts the vector at the start position (inference)
        assert not result.rows[2].entered_latent
        starts[layout] = [row.latent_start for row in result.rows]
    assert starts == {"inference": [1, 3, None], "training": [2, 4, None]}
    override = LatentDecoder(with_protocol(tiny_subject, MONET, False), DecodeConfig(latent_layout="training"))
    assert override.latent_layout == "training"


def test_inference_layout_with_a_forced_start_equals_the_reference(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, MONET.with_steps(3), force_start=True)
    batch = subject.encode(make_instances(tmp_path, SIZES[:2]))
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=8)).run(batch)
    start = subject.resolved_protocol.start_id
    for row in result.rows:  # the start token was never embedded: it sits at latent step 0
        assert row.forced_start and row.generated_ids[0] == start and row.latent_start == 0
    assert (result.sequences[:, : result.prompt_length] != start).all()
    _replay_check(subject, subject.encode(make_instances(tmp_path, SIZES[:2])), result)


def test_lvr_exit_feeds_the_models_own_choice(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, LVR, force_start=True)  # LVR's exit rule: the model's own argmax
    latent_end = subject.tokenizer.convert_tokens_to_ids("<|lvr_latent_end|>")
    script = {(0, 4): latent_end}
    batch = subject.encode(make_instances(tmp_path, SIZES[:3]))
    result = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=10), script).run(batch)
    hidden = replay(subject, batch, result)
    logits = subject.model.lm_head(hidden)
    for r, row in enumerate(result.rows):
        assert row.latent_segments[0] == (0, 4) and row.step_kinds[4] != LATENT
        exit_id = row.generated_ids[4]
        assert row.latent_exit_ids[0] == exit_id
        if r == 0:
            assert exit_id == latent_end
        else:  # nothing forced: the argmax of the state after the last latent step
            assert exit_id == int(logits[r, result.prompt_length + 3].argmax())
    forced = with_protocol(tiny_subject, replace(LVR, exit_rule="force_end"), force_start=True)
    rows = LatentDecoder(forced, DecodeConfig(max_new_tokens=6)).run(forced.encode(make_instances(tmp_path, SIZES[:2])))
    assert all(row.latent_exit_ids == [forced.resolved_protocol.end_id] for row in rows.rows)


def test_zero_latent_steps_means_none_and_negative_is_an_error(tiny_subject, tmp_path):
    import pytest

    from latentprobe.errors import LatentProbeError

    result = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=5, latent_steps=0)).run(
        tiny_subject.encode(make_instances(tmp_path, SIZES[:2])))
    assert all(row.n_latent_steps == 0 and not row.entered_latent for row in result.rows)
    for bad in (-1, -4, 1.5, True):
        with pytest.raises(LatentProbeError, match="latent_steps"):
            DecodeConfig(latent_steps=bad)


def test_non_finite_values_fail_only_their_row(tiny_subject, tmp_path):
    from latentprobe.interventions import LatentFunction, RowBinding
    from latentprobe.runs.common import decode_with_isolation

    instances = make_instances(tmp_path, SIZES[:3])
    batch = tiny_subject.encode(instances)
    config = DecodeConfig(max_new_tokens=8)
    clean = LatentDecoder(tiny_subject, config).run(batch)
    # row 0: an edit makes latent step 1 NaN
    nan = LatentFunction(lambda v, s: v * float("nan"), name="nan", steps=[1])
    edits = [nan.bind(RowBinding("i0")), None, None]
    decoder = LatentDecoder(tiny_subject, config)
    # row 1: the final hidden state turns inf at the third step
    norm = tiny_subject.model.model.language_model.norm

    def poison(module, inputs, output):
        ctx = decoder.context
        if ctx is not None and ctx.step == 2:
            output = output.clone()
            output[1] = float("inf")
            return output

    handle = norm.register_forward_hook(poison)
    try:
        result = decoder.run(batch, edits)
    finally:
        handle.remove()
    first, second, third = result.rows
    assert first.stop_reason == "non_finite" and "latent vector" in first.error and first.n_latent_steps == 1
    assert second.stop_reason == "non_finite" and "hidden state or logits" in second.error
    assert first.answer_logits is None and first.answer_slot == "none"
    assert not third.failed and third.generated_ids == clean.rows[2].generated_ids
    torch.testing.assert_close(third.latent_vectors, clean.rows[2].latent_vectors)
    # the runners record such a row as failed with the decoder's reason
    decoder.run = lambda b: result
    out = list(decode_with_isolation(decoder, tiny_subject, instances, None))
    assert [o[4] is not None for o in out] == [True, True, False] and "non-finite" in out[0][4]


def test_budget_ending_inside_a_latent_phase_is_reported_honestly(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, MONET.with_layout("training"), force_start=True)  # keeps sampled ids
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=3)).run(
        subject.encode(make_instances(tmp_path, SIZES[:2])))
    for row in result.rows:
        assert row.stop_reason == "max_new_tokens_in_latent"
        assert row.step_kinds == [LATENT, LATENT] and row.n_latent_steps == 2  # the third was never fed
        assert row.text == "" and row.raw_text == ""


def test_replay_takes_a_generated_image_pad_as_text(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, None, force_start=False)
    image_pad = subject.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    script = {(0, 1): image_pad, (1, 0): image_pad, (1, 1): image_pad}
    batch = subject.encode(make_instances(tmp_path, SIZES[:2]))
    result = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=5), script).run(batch)
    assert result.rows[1].generated_ids[:2] == [image_pad, image_pad]
    _replay_check(subject, batch, result, script)


def test_repeats_under_sampling_draw_their_own_streams(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, None, force_start=False)
    config = DecodeConfig(max_new_tokens=8, do_sample=True, temperature=3.0, seed=3)
    decoder = LatentDecoder(subject, config)
    batch = subject.encode(make_instances(tmp_path, SIZES[:2]))
    single = decoder.run(batch)
    repeated = decoder.decode(decoder.prefill(batch), repeats=3)
    again = decoder.decode(decoder.prefill(batch), repeats=3)
    ids = [row.generated_ids for row in repeated.rows]
    assert ids == [row.generated_ids for row in again.rows]  # reproducible
    for b in range(2):
        copies = ids[3 * b: 3 * b + 3]
        assert copies[0] == single.rows[b].generated_ids  # copy 0 is the instance's own stream
        assert len({tuple(c) for c in copies}) == 3  # three different samples
    shared = decoder.decode(decoder.prefill(batch), repeats=3, streams=[0, 0, 0])
    assert all(row.generated_ids == single.rows[k // 3].generated_ids for k, row in enumerate(shared.rows))


def test_eos_ids_include_the_generation_config(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, None, force_start=False)
    endoftext = subject.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    generation = subject.model.generation_config
    saved = generation.eos_token_id
    generation.eos_token_id = [subject.tokenizer.convert_tokens_to_ids("<|im_end|>"), endoftext]
    try:
        assert endoftext in subject.eos_token_ids
        batch = subject.encode(make_instances(tmp_path, SIZES[:2]))
        result = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=8), {(0, 2): endoftext}).run(batch)
        assert result.rows[0].stop_reason == "eos" and result.rows[0].generated_ids[-1] == endoftext
        assert len(result.rows[0].generated_ids) == 3
        # generate stops on the same ids when left to its generation_config
        reference = subject.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, max_new_tokens=8,
            do_sample=False, pad_token_id=subject.pad_token_id)
        plain = LatentDecoder(subject, DecodeConfig(max_new_tokens=8)).run(batch)
        for r, row in enumerate(plain.rows):
            assert reference[r, batch.input_ids.shape[1]:][: len(row.generated_ids)].tolist() == row.generated_ids
    finally:
        generation.eos_token_id = saved


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", 0.0), ("temperature", -1.0),
                                          ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_p", float("nan")), ("top_k", -1), ("top_k", 2.5),
                                          ("max_new_tokens", 0), ("max_new_tokens", 3.5)])
def test_decode_config_refuses_numbers_outside_their_range(field, value):
    from latentprobe.errors import LatentProbeError

    with pytest.raises(LatentProbeError, match=field):
        DecodeConfig(**{field: value})
