"""The answer slot against a no-cache oracle: the distribution read at each row's slot equals one full forward of
prompt + output up to the slot (+ the appended prefix when it was forced), whether the slot was found in the
output, found at an unfed last token, or forced after the budget or an eos ended the row."""

from dataclasses import replace

import pytest
import torch

from latentprobe.model.answer_slot import find_prefix_end
from latentprobe.model.decoding import LATENT, DecodeConfig, LatentDecoder
from latentprobe.model.protocol import LVR, MONET
from latentprobe.model.subject import PromptStyle, Subject

from decoding_helpers import ScriptedDecoder, make_instances

SIZES = [(56, 56), (84, 112), (112, 56), (56, 84)]


def _subject(tiny, protocol=None, force_start=False, **kwargs):
    return Subject(name="tiny", model=tiny.model, tokenizer=tiny.tokenizer, image_processor=tiny.image_processor,
                   protocol=protocol, prompt_style=PromptStyle(force_latent_start=force_start), max_new_tokens=16,
                   **kwargs)


@torch.no_grad()
def oracle_slot_logits(subject, instance, row, tail_ids):
    """One forward without cache over the prompt and ``tail_ids`` (the output head, then any forced ids), the
    row's fed latent vectors at its latent positions; the logits after the last position."""
    batch = subject.encode([instance])
    prompt = batch.input_ids
    ids = torch.cat([prompt, torch.tensor([tail_ids])], dim=1)
    embeds = subject.model.get_input_embeddings()(ids)
    latent_offsets = [j for j, kind in enumerate(row.step_kinds) if kind == LATENT and j < len(tail_ids)]
    for k, j in enumerate(latent_offsets):
        embeds[0, prompt.shape[1] + j] = row.latent_vectors[k]
    mm = torch.zeros_like(ids)
    mm[:, : prompt.shape[1]] = batch.mm_token_type_ids
    attention = torch.ones_like(ids)
    positions, _ = subject.model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch.image_grid_thw,
                                                      attention_mask=attention)
    hidden = subject.model.model(input_ids=ids, inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                                 pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                 mm_token_type_ids=mm, use_cache=False).last_hidden_state
    return subject.model.lm_head(hidden[0, -1]).float()


def _expected_tail(row, prefix_ids, eos_ids):
    """What the slot conditions on: the output up to the slot when found; else the output (a final eos dropped)
    and the prefix."""
    if row.answer_slot == "forced":
        kept = list(row.generated_ids)
        if kept and kept[-1] in eos_ids:
            kept.pop()
        return kept + prefix_ids
    return list(row.generated_ids[: row.answer_slot_offset])


def test_prefix_is_found_by_text_whatever_its_tokenisation(tiny_subject):
    tok = tiny_subject.tokenizer
    ids = tok.encode("so it is \\boxed{A}", add_special_tokens=False)  # ' \\' here, '\\' alone
    assert tok.encode("\\boxed{", add_special_tokens=False)[0] not in ids
    k, exact = find_prefix_end(tok, ids, "\\boxed{")
    assert exact and tok.decode(ids[: k + 1]).endswith("\\boxed{") and tok.decode(ids[k + 1:]) == "A}"
    k, exact = find_prefix_end(tok, ids, "\\box")  # ends inside the token 'boxed'
    assert not exact and tok.decode(ids[: k + 1]).endswith("boxed")
    assert find_prefix_end(tok, ids, "<answer>") is None
    twice = tok.encode("\\boxed{A} or \\boxed{B}", add_special_tokens=False)
    k, _ = find_prefix_end(tok, twice, "\\boxed{")  # the last occurrence, as the boxed parser reads
    assert tok.decode(twice[k + 1:]) == "B}"


def test_slot_found_or_forced_equals_a_full_recompute(tiny_subject, tmp_path):
    subject = _subject(tiny_subject, answer_prefix="\\boxed{")
    tok = subject.tokenizer
    in_context = tok.encode("is \\boxed{", add_special_tokens=False)  # 'is', ' \\', 'boxed', '{'
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    budget = 10
    script = {}
    for j, token in enumerate(in_context):  # row 0: writes the prefix at offsets 1-4
        script[(0, 1 + j)] = token
    script[(2, 2)] = eos  # row 2: ends with eos before any prefix
    for j, token in enumerate(in_context):  # row 3: the prefix's last token is the last one the budget allows
        script[(3, budget - len(in_context) + j)] = token
    instances = make_instances(tmp_path, SIZES)
    result = ScriptedDecoder(subject, DecodeConfig(max_new_tokens=budget), script).run(subject.encode(instances))
    prefix_ids = tok.encode("\\boxed{", add_special_tokens=False)
    statuses = [row.answer_slot for row in result.rows]
    assert statuses[0] == "found" and result.rows[0].answer_slot_offset == 1 + len(in_context)
    assert statuses[1] == "forced" and statuses[2] == "forced" and result.rows[2].stop_reason == "eos"
    assert statuses[3] == "found" and result.rows[3].answer_slot_offset == budget  # its last token was never fed
    for inst, row in zip(instances, result.rows):
        expected = oracle_slot_logits(subject, inst, row, _expected_tail(row, prefix_ids, {eos}))
        torch.testing.assert_close(row.answer_logits, expected, atol=1e-4, rtol=1e-4)


def test_slot_after_the_latent_end_found_or_forced(tiny_subject, tmp_path):
    """No prefix on a latent subject: the slot follows the end token; a budget that ends the latent phase early
    forces the end token and reads after it (the organisms' rule)."""
    proto = replace(LVR, exit_rule="force_end")
    subject = _subject(tiny_subject, proto, force_start=True)
    instances = make_instances(tmp_path, SIZES[:2])
    end_ids = subject.tokenizer.encode(proto.end_token, add_special_tokens=False)
    for budget, status in ((8, "found"), (3, "forced")):
        result = LatentDecoder(subject, DecodeConfig(max_new_tokens=budget)).run(subject.encode(instances))
        for inst, row in zip(instances, result.rows):
            assert row.answer_slot == status
            if status == "found":
                assert row.answer_slot_offset == 5  # 4 latent steps, the end token, then the answer
            else:
                assert row.stop_reason == "max_new_tokens_in_latent"
            expected = oracle_slot_logits(subject, inst, row, _expected_tail(row, end_ids, set()))
            torch.testing.assert_close(row.answer_logits, expected, atol=1e-4, rtol=1e-4)


def test_slot_in_monet_inference_layout_when_the_model_writes_no_box(tiny_subject, tmp_path):
    subject = _subject(tiny_subject, MONET.with_steps(3), force_start=True, answer_prefix="\\boxed{")
    instances = make_instances(tmp_path, SIZES[:2])
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=9)).run(subject.encode(instances))
    prefix_ids = subject.tokenizer.encode("\\boxed{", add_special_tokens=False)
    # the inference layout ran the prompt without its start token and wrote the start at a latent position
    free_prompt = _subject(tiny_subject, MONET, force_start=False)
    for inst, row in zip(instances, result.rows):
        assert row.generated_ids[0] == subject.resolved_protocol.start_id and row.step_kinds[0] == LATENT
        assert row.answer_slot == "forced"
        tail = _expected_tail(row, prefix_ids, set(subject.eos_token_ids))
        expected = oracle_slot_logits(free_prompt, inst, row, tail)
        torch.testing.assert_close(row.answer_logits, expected, atol=1e-4, rtol=1e-4)


def test_prompt_ending_with_the_close_marker_puts_the_slot_first(tiny_subject, tmp_path):
    subject = _subject(tiny_subject, None, text_mediator_markers=("<imagine>", "</imagine>"), mediator="text")
    instances = make_instances(tmp_path, SIZES[:2])
    prompts = [subject.prompt_text(inst) + "<imagine>a red cell</imagine>" for inst in instances]
    batch = subject.encode(instances, prompts=prompts)
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=4)).run(batch)
    for r, row in enumerate(result.rows):
        assert row.answer_slot == "found" and row.answer_slot_offset == 0
        one = subject.encode([instances[r]], prompts=[prompts[r]])
        with torch.no_grad():
            alone = LatentDecoder(subject, DecodeConfig(max_new_tokens=1)).prefill(one)
        torch.testing.assert_close(row.answer_logits, subject.model.lm_head(alone.hidden[0]).float(),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,prefix", [("lvr", "<answer>"), ("monet", "\\boxed{"), ("mirage", "\\boxed{")])
def test_families_name_their_answer_prefix(name, prefix):
    from latentprobe.model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    spec = SUBJECTS[name]
    assert spec.answer_prefix == prefix and prefix in spec.describe()["answer_slot"]


def test_trace_rows_and_summary_say_how_each_slot_was_read(tiny_subject, tmp_path):
    from latentprobe.data import builtin_instances
    from latentprobe.runs.store import TraceStore
    from latentprobe.runs.trace import trace

    subject = _subject(tiny_subject, None, answer_prefix="\\boxed{")
    summary = trace(subject, builtin_instances(3), tmp_path / "t", config=DecodeConfig(max_new_tokens=4))
    index = TraceStore(tmp_path / "t").index()
    assert set(index.answer_slot) == {"forced"} and (index.answer_slot_offset == 4 + 3).all()
    assert index.gold_prob.notna().all()
    assert summary.n_slot_forced == 3 and "0/3 found in the output, 3 forced" in "\n".join(summary.lines())
    manifest = TraceStore(tmp_path / "t").manifest
    assert manifest["answer_prefix"] == "\\boxed{" and manifest["latent_layout"] is None
