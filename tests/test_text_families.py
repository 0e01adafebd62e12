"""Text latent-CoT subjects (Coconut, CODI) on text backbones (GPT-2, Qwen2): the decoder against the authors'
own algorithms re-implemented here from their code, `check` on stand-ins, sites and the Recorder against a
no-cache recompute, loaders, and image-only parts refusing a text subject."""

import json

import pytest
import torch
from torch import nn

from latentprobe.runs.conformance import run_check
from latentprobe.data import builtin_instances, builtin_text_instances
from latentprobe.model.compat import cache_keywords
from latentprobe.model.decoding import DecodeConfig, LATENT, LatentDecoder, replay
from latentprobe.errors import LatentProbeError
from latentprobe.model.recording import Recorder, RecordSpec, site_tensor
from latentprobe.model.sites import Site
from latentprobe.model.subjects import load_subject

from standins import ScriptedOutputs
from text_standins import TEXT_SCRIPTS, build_text_standin


@pytest.fixture(scope="module")
def text_standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-standins")
    return {(family, kind): build_text_standin(family, root / f"{family}-{kind}", kind=kind)
            for family in ("coconut", "codi") for kind in ("gpt2", "qwen2")}


def mixed_instances():
    """Three text instances of different prompt lengths (so the batch is left-padded)."""
    import dataclasses

    longer = dataclasses.replace(builtin_text_instances(1, hops=4)[0], id="builtin-text-long")
    return builtin_text_instances(2) + [longer]


def _rows_prompt_ids(subject, batch, r):
    return batch.input_ids[r][batch.attention_mask[r].bool()]


# ------------------------------------------------------------------- the authors' algorithms, written from their code

@torch.no_grad()
def coconut_reference(model, ids, latent_id, eos_id, max_new_tokens):
    """facebookresearch/coconut coconut.py, batch 1: each <|latent|> position takes the last hidden state of the
    position before it (one pass per latent, here a full recompute each time), then argmax decoding without a
    cache, the first token kept even if it is eos, later ones until eos."""
    embed = model.get_input_embeddings()
    x = embed(ids.unsqueeze(0))
    latent_positions = (ids == latent_id).nonzero().flatten().tolist()
    for position in latent_positions:
        hidden = model(inputs_embeds=x, output_hidden_states=True).hidden_states[-1]
        x = x.clone()
        x[0, position] = hidden[0, position - 1]
    vectors = x[0, latent_positions].clone()
    tokens = [int(model(inputs_embeds=x).logits[0, -1].argmax())]
    x = torch.cat([x, embed(torch.tensor([[tokens[-1]]]))], dim=1)
    for _ in range(max_new_tokens - 1):
        next_token = int(model(inputs_embeds=x).logits[0, -1].argmax())
        if next_token == eos_id:
            break
        tokens.append(next_token)
        x = torch.cat([x, embed(torch.tensor([[next_token]]))], dim=1)
    return vectors, tokens


@torch.no_grad()
def codi_reference(model, prj, ids_with_bot, eot_id, eos_id, n_latent, max_new_tokens):
    """zhenyi4/codi test.py, batch 1: prefill question + bot, project its last state, feed and project 6 latents,
    feed eot, then argmax over the logits without the last id, eos kept, with the KV cache (passed under the name
    the installed transformers takes: `cache` from 5.25, where `past_key_values` warns and goes away in 5.40)."""
    out = model(input_ids=ids_with_bot.unsqueeze(0), use_cache=True, output_hidden_states=True)
    cache, latent = out.past_key_values, prj(out.hidden_states[-1][:, -1:])
    vectors = []
    for _ in range(n_latent):
        vectors.append(latent[0, 0])
        out = model(**cache_keywords(model, dict(inputs_embeds=latent, use_cache=True, output_hidden_states=True,
                                                 past_key_values=cache)))
        cache, latent = out.past_key_values, prj(out.hidden_states[-1][:, -1:])
    x = model.get_input_embeddings()(torch.tensor([[eot_id]]))
    tokens = []
    for _ in range(max_new_tokens):
        out = model(**cache_keywords(model, dict(inputs_embeds=x, use_cache=True, past_key_values=cache)))
        cache = out.past_key_values
        next_token = int(out.logits[:, -1, : model.config.vocab_size - 1].argmax())
        tokens.append(next_token)
        if next_token == eos_id:
            break
        x = model.get_input_embeddings()(torch.tensor([[next_token]]))
    return torch.stack(vectors), tokens


def _independent_prj(folder):
    """CODI's prj rebuilt from the checkpoint's raw tensors (src/model.py layout), without latentprobe's loader."""
    from safetensors.torch import load_file

    tensors = {k[len("prj."):]: v for k, v in load_file(str(folder / "model.safetensors")).items()
               if k.startswith("prj.")}
    prj_dim, dim = tensors["1.weight"].shape
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(dim, prj_dim), nn.GELU(), nn.Linear(prj_dim, dim))
    prj.add_module("ln", nn.LayerNorm(dim))
    prj.load_state_dict(tensors)
    return prj.eval()


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_coconut_decoding_equals_the_authors_algorithm(text_standins, kind):
    subject = load_subject("coconut", checkpoint=str(text_standins[("coconut", kind)]))
    batch = subject.encode(mixed_instances())
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # left-padded: rows of different lengths
    new_text = 10
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=6 + 1 + new_text)).run(batch)
    proto = subject.resolved_protocol
    for r, row in enumerate(result.rows):
        prompt = _rows_prompt_ids(subject, batch, r)
        assert int(prompt[-1]) == proto.start_id  # question + "\n", then the start token, as dataset.py builds it
        full = torch.cat([prompt, torch.tensor([proto.pad_id] * 6 + [proto.end_id])])
        vectors, tokens = coconut_reference(subject.model, full, proto.pad_id, subject.tokenizer.eos_token_id,
                                            new_text)
        assert row.n_latent_steps == 6 and row.generated_ids[6] == proto.end_id
        torch.testing.assert_close(row.latent_vectors, vectors, atol=1e-4, rtol=1e-4)
        ours = [t for t in row.generated_ids[7:] if t != subject.tokenizer.eos_token_id]
        assert ours == tokens[: len(ours)] and len(ours) >= min(len(tokens), new_text - 1)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_codi_decoding_equals_the_authors_loop(text_standins, kind):
    folder = text_standins[("codi", kind)]
    subject = load_subject("codi", checkpoint=str(folder))
    assert hasattr(subject.model, "prj")
    batch = subject.encode(mixed_instances())
    new_text = 10
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=6 + 1 + new_text)).run(batch)
    proto = subject.resolved_protocol
    eos = subject.tokenizer.eos_token_id
    prj = _independent_prj(folder)
    rows = subject.model.get_input_embeddings().weight.shape[0]
    assert (proto.pad_id, proto.start_id, proto.end_id) == (rows - 3, rows - 2, rows - 1)  # src/model.py ids
    for r, row in enumerate(result.rows):
        prompt = _rows_prompt_ids(subject, batch, r)
        vectors, tokens = codi_reference(subject.model, prj, prompt, proto.end_id, eos, 6, new_text)
        assert row.n_latent_steps == 6 and row.generated_ids[6] == proto.end_id
        torch.testing.assert_close(row.latent_vectors, vectors, atol=1e-4, rtol=1e-4)
        assert row.generated_ids[7:] == tokens[: len(row.generated_ids) - 7]
        assert proto.end_id not in row.generated_ids[7:]  # the eot id is cut from the logits, as test.py does


@pytest.mark.parametrize("family", ["coconut", "codi"])
def test_check_passes_on_scripted_text_standins(text_standins, family):
    folder = text_standins[(family, "gpt2")]
    report = run_check(family, str(folder), max_new_tokens=32,
                       prepare=lambda subject: ScriptedOutputs(subject, TEXT_SCRIPTS[family]))
    lines = {line.name: line for line in report.lines}
    assert report.ok, report.table()
    assert lines["architecture"].status == "pass" and "text-only" in lines["architecture"].detail
    assert lines["cache vs recompute"].status == "pass"
    assert lines["answer"].status == "pass" and "'7'" in lines["answer"].detail
    assert lines["answer slot"].status == "pass"
    assert "6 steps" in lines["latent phase"].detail
    assert all("added at load" in line.detail for name, line in lines.items() if name.startswith("token "))
    if family == "codi":
        assert "through prj (the first one too)" in lines["layout, stop rule"].detail
        assert lines["head"].status == "pass"


def test_codi_without_its_head_or_with_foreign_ids_is_refused(tmp_path):
    folder = build_text_standin("codi", tmp_path / "no-head", with_head=False)
    with pytest.raises(LatentProbeError, match="no prj"):
        load_subject("codi", checkpoint=str(folder))
    folder = build_text_standin("codi", tmp_path / "other-tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for token in ("<|codi_bot|>", "[PAD]"):  # saved in the wrong order: bot would take the pad's id
        tokenizer.add_tokens(token, special_tokens=True)
    tokenizer.save_pretrained(folder)
    with pytest.raises(LatentProbeError, match="authors' id") as error:
        load_subject("codi", checkpoint=str(folder))
    assert "<|codi_bot|>" in error.value.problem
    folder = build_text_standin("codi", tmp_path / "extra-token")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens("<|extra|>")  # one token more: CODI's would need rows the model does not have
    tokenizer.save_pretrained(folder)
    with pytest.raises(LatentProbeError, match="no embedding rows"):
        load_subject("codi", checkpoint=str(folder))


def test_coconut_without_a_checkpoint_says_what_to_pass():
    with pytest.raises(LatentProbeError, match="no published checkpoint"):
        load_subject("coconut")


# ------------------------------------------------------------------------------- sites, Recorder, refusals

def test_recorder_sites_equal_a_no_cache_recompute_on_a_text_subject(text_standins):
    subject = load_subject("coconut", checkpoint=str(text_standins[("coconut", "qwen2")]))
    batch = subject.encode(builtin_text_instances(2))
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=12))
    with Recorder(decoder, RecordSpec(layers="all", answer=True)) as recorder:
        result = decoder.run(batch)
    records = recorder.records()
    assert "image_mean" not in records[0] and "image_tokens" not in records[0]  # no image group on text
    states = replay(subject, batch, result, output_hidden_states=True)
    for r, row in enumerate(result.rows):
        positions = [result.prompt_length + j for j, kind in enumerate(row.step_kinds) if kind == LATENT]
        for layer in range(subject.num_layers + 1):
            for k, position in enumerate(positions):
                got = site_tensor(records[r], recorder.layers, Site("latent", layer, k))
                torch.testing.assert_close(got, states[layer][r, position].float(), atol=1e-4, rtol=1e-4)
            got = site_tensor(records[r], recorder.layers, Site("prompt_last", layer))
            torch.testing.assert_close(got, states[layer][r, result.prompt_length - 1].float(), atol=1e-4, rtol=1e-4)


def test_image_parts_refuse_a_text_subject_in_one_line(text_standins):
    subject = load_subject("coconut", checkpoint=str(text_standins[("coconut", "gpt2")]))
    with pytest.raises(LatentProbeError, match="text-only model") as error:
        subject.encode(builtin_instances(1))
    assert "\n" not in error.value.problem
    decoder = LatentDecoder(subject)
    with pytest.raises(LatentProbeError, match="text-only"):
        Recorder(decoder, RecordSpec.for_sites(["image.layer[1]"]))


def test_text_backbone_sites_map_to_blocks_and_final_norm(text_standins):
    from latentprobe.model.sites import layer_modules, num_layers

    gpt2 = load_subject("coconut", checkpoint=str(text_standins[("coconut", "gpt2")]))
    qwen = load_subject("coconut", checkpoint=str(text_standins[("coconut", "qwen2")]))
    assert num_layers(gpt2.model) == gpt2.num_layers == 2
    assert layer_modules(gpt2.model)[2][0] is gpt2.model.transformer.ln_f
    assert layer_modules(qwen.model)[1][0] is qwen.model.model.layers[0]


# ----------------------------------------------------------------------------------------------- loaders

def test_prosqa_and_gsm8k_aug_loaders_read_the_released_json(tmp_path):
    from latentprobe.data.benchmarks import load_benchmark

    prosqa = [{"question": "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rempus?",
               "answer": "Alex is a yumpus.", "steps": ["Alex is a wumpus.", "Every wumpus is a yumpus."]}]
    (tmp_path / "prosqa_test.json").write_text(json.dumps(prosqa))
    (tmp_path / "gsm_test.json").write_text(json.dumps([{"question": "Tom has 1,000 apples ...",
                                                         "steps": ["<<1000+2=1002>>"], "answer": "1,002"}]))
    (tmp_path / "codi.jsonl").write_text(json.dumps({"question": "q?", "cot": "<<2*3=6>>", "answer": "#### 6"}))
    [inst] = load_benchmark("prosqa", str(tmp_path))
    assert inst.answer == "Alex is a yumpus." and inst.attributes["choices"] == ["yumpus", "rempus"]
    assert inst.images == [] and inst.task == "prosqa" and inst.split == "test"
    [gsm] = load_benchmark("gsm8k-aug", str(tmp_path))
    assert gsm.answer == "1002" and gsm.attributes["steps"] == ["<<1000+2=1002>>"]
    [codi] = load_benchmark("gsm8k-aug", str(tmp_path / "codi.jsonl"))
    assert codi.answer == "6" and codi.attributes["steps"] == ["<<2*3=6>>"]
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "no answer"}]))
    with pytest.raises(LatentProbeError, match="missing field"):
        load_benchmark("gsm8k-aug", str(tmp_path / "bad.json"))


def test_parsers_read_answers_as_the_authors_do():
    from latentprobe.model.answers import score_answer
    from latentprobe.data import Instance

    gsm = Instance(id="g", question="?", answer="1002")
    assert score_answer("<<1000+2=1002>> ### 1,002", gsm, "after_hash").correct
    assert score_answer("The answer is: 1,002.", gsm, "last_number").correct
    assert score_answer("no number here", gsm, "last_number").status == "unparsable"
    prosqa = Instance(id="p", question="?", answer="Alex is a yumpus.")
    assert score_answer("### Alex is a yumpus.", prosqa, "after_hash").correct
    letter = Instance(id="l", question="?", answer="B", options=["cat", "dog"])
    assert score_answer("I looked. Final answer: B\nDone", letter, "final_answer").correct


# --------------------------------------------------------------------------------- the README's "add a family"

def test_the_readme_add_a_family_recipe_is_one_file_that_check_accepts(tmp_path, monkeypatch, capsys):
    """The python block under "### Add a family" in the README, saved as a module and named in
    LATENTPROBE_FAMILIES, registers a family that `latentprobe subjects` lists and `check` passes."""
    import re
    import sys
    from pathlib import Path

    from latentprobe.cli import main
    from latentprobe.model.protocol import PROTOCOLS
    from latentprobe.model.subjects import SUBJECTS
    from latentprobe.model.subjects.families import SUBJECTS_BY_NAME

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Add a family", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "lp_pause_family.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LATENTPROBE_FAMILIES", "lp_pause_family")
    folder = build_text_standin("coconut", tmp_path / "ckpt")
    try:
        report = run_check("pause-gpt2", str(folder), max_new_tokens=24,
                           prepare=lambda subject: ScriptedOutputs(subject, "### 7"))
        lines = {line.name: line for line in report.lines}
        assert report.ok, report.table()
        assert "3 steps" in lines["latent phase"].detail and "exactly 3 latent steps" in lines["layout, stop rule"].detail
        assert main(["subjects"]) in (0, None)
        assert "pause-gpt2" in capsys.readouterr().out
    finally:
        SUBJECTS.pop("pause-gpt2", None)
        SUBJECTS_BY_NAME.pop("pause-gpt2", None)
        PROTOCOLS.pop("pause", None)
        sys.modules.pop("lp_pause_family", None)


def test_a_family_module_that_cannot_be_imported_is_one_clear_line(monkeypatch):
    from latentprobe.model.subjects import load_subject as load

    monkeypatch.setenv("LATENTPROBE_FAMILIES", "no_such_family_module_xyz")
    with pytest.raises(LatentProbeError, match="LATENTPROBE_FAMILIES"):
        load("tiny")
