"""The real model families on tiny stand-in checkpoints with the same token strings and templates."""

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentprobe.data import builtin_instances
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.errors import LatentProbeError
from latentprobe.model.subjects import SUBJECTS, load_subject
from latentprobe.model.subjects.families import (LETTER_SUFFIX, MIRAGE_VSP_PLANNING, MONET_SYSTEM, SUBJECTS_BY_NAME,
                                           benchmark_options, decoding_preset)
from latentprobe.model.subjects.tiny import save_checkpoint
from latentprobe.data import Instance
from PIL import Image

from standins import FAMILIES, ScriptedOutputs, build_standin, scripted


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("standin") / "ckpt")


@pytest.fixture(scope="module")
def family_subjects(tmp_path_factory):
    """Each family loaded from its stand-in checkpoint (real token strings, config ids, template)."""
    root = tmp_path_factory.mktemp("families")
    return {family: load_subject(family, checkpoint=str(build_standin(family, root / family)))
            for family in FAMILIES}


def options_instance(answer="green", **kwargs):
    image = builtin_instances(1)[0].images
    return Instance(id="q", question="Which colour is the top-left cell?", answer=answer,
                    options=["red", "green", "blue", "yellow"], images=image, **kwargs)


def user_text(prompt):
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_family_specs_carry_the_authors_choices():
    monet, lvr, mirage, capimagine, qwen = (SUBJECTS_BY_NAME[n] for n in FAMILIES)
    assert (lvr.hub_id, mirage.hub_id) == ("vincentleebang/LVR-7B", "Miiche/vsp_spatial_planning_direct_sft")
    assert [s.answer_parser for s in (monet, lvr, mirage, capimagine, qwen)] == [
        "boxed", "answer_tag_letter", "boxed", "boxed", "letter"]
    assert capimagine.text_mediator_markers == ("<think_image>", "</think_image>")
    assert {k: monet.authors_settings[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == {
        "temperature": 0.1, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.01}
    assert (monet.authors_settings["min_pixels"], monet.authors_settings["max_pixels"]) == (256 * 784, 8192 * 784)
    assert (mirage.authors_settings["temperature"], mirage.authors_settings["top_p"]) == (0.7, 0.9)
    assert benchmark_options("mirage", "VSP") == {"levels": (3, 4, 5, 6), "plan_rule": "end"}
    assert benchmark_options("lvr", "vsp") == {} and benchmark_options("tiny", "vsp") == {}
    assert mirage.prompt_style.system_prompt is None and lvr.prompt_style.system_prompt is None


def test_monet_prompt_is_vlmevalkits_with_its_system_prompt(family_subjects):
    subject = family_subjects["monet"]
    prompt = subject.prompt_text(options_instance())
    assert prompt.startswith(f"<|im_start|>system\n{MONET_SYSTEM}<|im_end|>")
    assert user_text(prompt) == ("<|vision_start|><|image_pad|><|vision_end|>Question: Which colour is the top-left "
                                 "cell?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\nPlease select the "
                                 "correct answer from the options above. \n")
    assert prompt.endswith("<|im_start|>assistant\n")
    size = subject.image_processor.size  # Monet's pixel budget, applied at load
    assert (size["shortest_edge"], size["longest_edge"]) == (256 * 28 * 28, 8192 * 28 * 28)


def test_lvr_prompt_is_the_raw_vstar_text_plus_its_instruction(family_subjects):
    subject = family_subjects["lvr"]
    raw = "What is the colour?\n(A) red\n(B) green\nAnswer with the option's letter from the given choices directly."
    vstar_like = options_instance(attributes={"raw_text": raw})
    assert user_text(subject.prompt_text(vstar_like)).endswith(raw + LETTER_SUFFIX)
    # elsewhere the MMVP layout of LVR's evaluation: question, "Options:", one "X. text" line each, instruction
    assert user_text(subject.prompt_text(options_instance())).endswith(
        "Which colour is the top-left cell?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n" + LETTER_SUFFIX)
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in subject.prompt_text(vstar_like)
    # gold_prob is read over the option letters as LVR writes them after "<answer>" (" B": a leading space)
    letters = [subject.tokenizer.encode("<answer> " + letter, add_special_tokens=False)[-1] for letter in "ABCD"]
    assert subject.answer_candidate_ids(vstar_like) == letters
    # a question swap replaces the question, not the instance's options
    swapped = user_text(subject.prompt_text(vstar_like, question="How many cells?"))
    assert swapped.endswith("How many cells?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n" + LETTER_SUFFIX)


def test_mirage_vsp_prompt_matches_its_test_script(family_subjects):
    """Oracle: Mirage's src/test.py renders the chat template without a generation prompt, moves the image from
    the start of the user turn to its <image> placeholder, and appends '<|im_start|>assistant'."""
    subject = family_subjects["mirage"]
    plan = Instance(id="p", question="(unused: Mirage has its own VSP text)", answer="D", task="spatial_planning",
                    images=builtin_instances(1)[0].images)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": MIRAGE_VSP_PLANNING}]}]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    rendered = subject.tokenizer.apply_chat_template(conversation, tokenize=False)
    oracle = rendered.replace(pad, "").replace("<image>", pad) + "<|im_start|>assistant"
    prompt = subject.prompt_text(plan)
    assert prompt == oracle
    assert "Here is the map: " + pad in prompt and "<|im_start|>system\nYou are a helpful assistant." in prompt
    assert prompt.endswith("The final answer MUST BE put in \\boxed{}.<|im_end|>\n<|im_start|>assistant")
    other = subject.prompt_text(options_instance())  # outside VSP planning: its \boxed{} instruction
    assert user_text(other).endswith("D. yellow\n The final answer MUST BE put in \\boxed{}.")


def test_capimagine_markers_default_override_and_validation(family_subjects, tmp_path):
    subject = family_subjects["capimagine"]
    assert subject.text_mediator_markers == ("<think_image>", "</think_image>")
    assert subject.describe()["text_mediator_markers"] == ["<think_image>", "</think_image>"]
    assert subject.mediator_span("<think_image> a red cell </think_image> \\boxed{A}") == "a red cell"
    folder = subject.checkpoint
    other = load_subject("capimagine", checkpoint=folder, mediator_markers="<imagine>,</imagine>")
    assert other.text_mediator_markers == ("<imagine>", "</imagine>")
    for bad, message in [("<a>,<a>", "both"), (",</a>", "empty"), ("<a>", "two strings"), ("a,b,c", "two strings")]:
        with pytest.raises(LatentProbeError, match=message):
            load_subject("capimagine", checkpoint=folder, mediator_markers=bad)
    with pytest.raises(LatentProbeError, match="no text mediator"):
        load_subject("qwen2.5-vl", checkpoint=folder, mediator_markers="<a>,</a>")


@pytest.mark.parametrize("family", FAMILIES)
def test_scripted_family_outputs_are_parsed_where_the_model_writes_them(family_subjects, family, tmp_path):
    """End to end: the stand-in writes its family's answer format; trace reads and scores it."""
    from latentprobe.runs.store import TraceStore
    from latentprobe.runs.trace import trace

    subject = family_subjects[family]
    right, wrong = options_instance("green"), options_instance("red")  # the scripts answer B = green
    wrong.id = "q-wrong"
    with scripted(subject, family):
        trace(subject, [right, wrong], tmp_path / "run", config=DecodeConfig(max_new_tokens=48))
    store = TraceStore(tmp_path / "run")
    index = store.index().set_index("instance_id")
    assert list(index.loc[["q", "q-wrong"], "answer_status"]) == ["correct", "wrong"]
    assert list(index.loc[["q", "q-wrong"], "parsed_answer"]) == ["B", "B"]
    manifest = store.manifest
    assert manifest["subject"]["answer_parser"] == SUBJECTS_BY_NAME[family].answer_parser
    if family == "capimagine":
        assert index.loc["q", "mediator_text"] == "green cell"
        assert manifest["subject"]["text_mediator_markers"] == ["<think_image>", "</think_image>"]
    if family in ("monet", "lvr", "mirage"):
        assert bool(index.loc["q", "entered_latent"]) and int(index.loc["q", "n_latent_steps"]) >= 3


def test_mirage_plans_are_scored_on_the_map_end_to_end(family_subjects, tmp_path):
    """Mirage on VSP: levels 3-6 by default, its plan in \\boxed{} simulated on the map by Mirage's rule."""
    from latentprobe.data import load_instances
    from latentprobe.runs.common import row_record

    maze = tmp_path / "VSP" / "maze" / "task-main" / "maps"
    for level, rows in ((4, ["SFFH", "FHFF", "FFFH", "HFFG"]), (7, ["SFFFFFG"] + ["FFFFFFF"] * 6)):
        image = Image.new("RGB", (level * 16, level * 16), (40, 40, 200))
        (maze / f"level{level}" / "img").mkdir(parents=True)
        image.save(maze / f"level{level}" / "img" / "0.png")
        (maze / f"level{level}" / "text").mkdir()
        (maze / f"level{level}" / "text" / "0.txt").write_text("\n".join(rows))
    instances, _ = load_instances(f"vsp:{tmp_path / 'VSP'}", benchmark_options=benchmark_options("mirage", "vsp"))
    assert [i.id for i in instances] == ["spatial_planning/level4/0"]  # level 7 is outside Mirage's evaluation
    [plan] = instances
    subject = family_subjects["mirage"]
    assert plan.answer == "D,D,R,D,R,R"  # the shortest plan stored; "R,R,D,D,D,R" is another, never stored
    written = ["D, D, R, D, R, R", "R,R,D,D,D,R", "R,D", "D,D,R,R,D,R,L"]
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=48))
    boxed = [f"<|latent_start|><|latent_end|>\\boxed{{{plan_text}}}" for plan_text in written]
    with ScriptedOutputs(subject, boxed, latent_steps=4):  # one prefill, one scripted copy per plan
        rows = decoder.decode(decoder.prefill(subject.encode([plan])), repeats=len(written)).rows
    assert [row.text.split("{")[-1] for row in rows] == [w + "}" for w in written]
    outcomes = {w: row_record(subject, plan, row)["answer_status"] for w, row in zip(written, rows)}
    # two different shortest plans are both right; through a hole, or leaving the goal again (Mirage's rule), wrong
    assert outcomes == {"D, D, R, D, R, R": "correct", "R,R,D,D,D,R": "correct", "R,D": "wrong",
                        "D,D,R,R,D,R,L": "wrong"}


def test_decoding_presets_from_the_command_line(family_subjects, capsys):
    import argparse

    from latentprobe.cli import decode_config_from_args

    args = argparse.Namespace(max_new_tokens=None, sample=False, temperature=1.0, top_p=1.0, top_k=0, seed=3,
                              latent_steps=None, decoding="greedy")
    monet = family_subjects["monet"]
    greedy = decode_config_from_args(args, monet)
    assert not greedy.do_sample and greedy.max_new_tokens == 4096
    args.decoding = "authors"
    authors = decode_config_from_args(args, monet)
    assert (authors.do_sample, authors.temperature, authors.top_p, authors.top_k, authors.seed) == (
        True, 0.1, 0.8, 50, 3)
    assert "repetition_penalty=1.01 is not supported" in capsys.readouterr().err
    mirage = decode_config_from_args(args, family_subjects["mirage"])
    assert (mirage.do_sample, mirage.temperature, mirage.top_p) == (True, 0.7, 0.9)
    assert decoding_preset(family_subjects["lvr"], "authors") == ({"do_sample": False, "max_new_tokens": 512}, {})
    args.sample = True
    with pytest.raises(LatentProbeError, match="--sample and --decoding authors"):
        decode_config_from_args(args, monet)
    with pytest.raises(LatentProbeError, match="no authors' decoding settings"):
        decoding_preset(family_subjects["capimagine"], "authors")


def test_subjects_show_and_cli_validation(capsys, tmp_path):
    from latentprobe.cli import main

    assert main(["subjects", "--show", "capimagine"]) in (0, None)
    shown = capsys.readouterr().out  # a table of fields, one per line
    assert re.search(r"^text_mediator_markers\s+\('<think_image>', '</think_image>'\)$", shown, re.M)
    assert main(["subjects", "--show", "monet"]) in (0, None)
    assert re.search(r"^authors_settings.repetition_penalty 1.01$", capsys.readouterr().out, re.M)
    code = main(["trace", "--subject", "capimagine", "--mediator-markers", "<a>,<a>", "--out", str(tmp_path / "t")])
    assert code == 2 and "both" in capsys.readouterr().err


def test_lvr_head_is_loaded_when_the_checkpoint_has_one(standin, tmp_path):
    folder = tmp_path / "lvr"
    folder.mkdir()
    for item in standin.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    dim = 64
    from latentprobe.model.subjects.lvr_head import LVRHead

    head = LVRHead(dim)  # LVR's own key names: lvr_head.ln_q.*, lvr_head.mlp.0.*, lvr_head.mlp.2.*
    weights.update({f"lvr_head.{k}": v for k, v in head.state_dict().items()})
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    subject = load_subject("lvr", checkpoint=str(folder))
    assert hasattr(subject.model, "lvr_head")
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=6))
    assert decoder.feedback_head is not None
    subject.prompt_style = replace(subject.prompt_style, force_latent_start=True)  # (a copy: the spec's is shared)
    batch = subject.encode(builtin_instances(1))
    result = decoder.run(batch)
    row = result.rows[0]
    assert row.n_latent_steps == 4
    # z_0 is h(start) as it is; every later fed vector is the head applied to the final-norm state before it
    from latentprobe.model.decoding import LATENT, replay

    hidden = replay(subject, batch, result)
    positions = [result.prompt_length + j for j, k in enumerate(row.step_kinds) if k == LATENT]
    before = hidden[0, [p - 1 for p in positions]]
    with torch.no_grad():
        expected = torch.cat([before[:1], subject.model.lvr_head(before[1:])])
    torch.testing.assert_close(row.latent_vectors, expected, atol=1e-4, rtol=1e-4)


def test_wrong_checkpoint_for_the_family_is_a_clear_error(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LatentProbeError, match="not Qwen2.5-VL"):
        load_subject("monet", checkpoint=str(folder))
    with pytest.raises(LatentProbeError, match="hub is offline"):
        load_subject("monet")  # default hub id, offline in tests


def test_lvr_candidates_are_the_tokens_it_writes_after_answer_tag(family_subjects):
    """LVR writes "<answer> B </answer>": with a BPE that merges the space into the letter (Qwen's " B"), the
    slot's candidates are the merged tokens; with one that does not, the letters after the space token."""
    from latentprobe.model.subject import answer_first_token

    class MergingTokenizer:
        vocab = {" ": 1, "A": 2, "B": 3, " A": 4, " B": 5}

        def encode(self, text, add_special_tokens=False):
            return [self.vocab[text]]

    assert [answer_first_token(MergingTokenizer(), " ", letter) for letter in "AB"] == [4, 5]
    assert [answer_first_token(MergingTokenizer(), "", letter) for letter in "AB"] == [2, 3]
    subject = family_subjects["lvr"]
    assert subject.answer_lead == " "
    tok = subject.tokenizer
    tail = [tok.encode("<answer> " + letter, add_special_tokens=False)[-1] for letter in "ABCD"]
    assert subject.answer_candidate_ids(options_instance()) == tail
    assert family_subjects["monet"].answer_lead == ""
