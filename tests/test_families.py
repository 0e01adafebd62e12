"""The real model families on tiny stand-in checkpoints with the same token strings and templates."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentprobe.data import builtin_instances
from latentprobe.decoding import DecodeConfig, LatentDecoder
from latentprobe.errors import LatentProbeError
from latentprobe.subjects import SUBJECTS, load_subject
from latentprobe.subjects.tiny import save_checkpoint


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("standin") / "ckpt")


@pytest.mark.parametrize("name,parser,protocol", [("monet", "boxed", "monet"), ("lvr", "letter", "lvr"),
                                                  ("mirage", "boxed", "mirage"), ("capimagine", "boxed", None),
                                                  ("qwen2.5-vl", "letter", None)])
def test_family_loads_a_standin_and_decodes(standin, name, parser, protocol):
    subject = load_subject(name, checkpoint=str(standin))
    assert subject.answer_parser == parser
    assert (subject.protocol.name if subject.protocol else None) == protocol
    instance = builtin_instances(1)[0]
    prompt = subject.prompt_text(instance)
    if name == "monet":
        assert "Put your final answer in \\boxed{}" in prompt
    if name in ("lvr", "qwen2.5-vl"):
        assert prompt.rstrip().endswith("<|im_start|>assistant") and "option's letter" in prompt
    if name == "mirage":
        assert "<|im_start|>system" not in prompt
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=6)).run(subject.encode([instance]))
    assert len(result.rows[0].generated_ids) == 6
    info = SUBJECTS[name].describe()
    assert info["default_checkpoint"] and info["answer_parser"] == parser


def test_lvr_head_is_loaded_when_the_checkpoint_has_one(standin, tmp_path):
    folder = tmp_path / "lvr"
    folder.mkdir()
    for item in standin.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    dim = 64
    from latentprobe.subjects.lvr_head import LVRHead

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
    from latentprobe.decoding import LATENT, replay

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
