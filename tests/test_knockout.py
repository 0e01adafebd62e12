"""Attention knockout: the same under sdpa and eager, the decoder's own key masks as an oracle, nothing changed
where nothing is blocked, the organisms' built-in wiring recovered, and bad requests refused before a model runs."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

from latentprobe.cli import main
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.errors import LatentProbeError
from latentprobe.interventions.knockout import AttentionKnockout, KnockoutHooks, knock_out, make_knockouts, run_knockout
from latentprobe.interventions import RowBinding
from latentprobe.organisms import load_organism
from latentprobe.where.patching import default_instances
from latentprobe.runs.common import row_record


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def held_out():
    return default_instances("organism-bottleneck", limit=48)[0]


@pytest.fixture(scope="module")
def organisms():
    cache = {}

    def get(name, attn="eager"):
        if (name, attn) not in cache:
            cache[(name, attn)] = load_organism(name, attn_implementation=attn)
        return cache[(name, attn)]

    return get


def _decode(subject, instances, knockout, answer_mask="protocol"):
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    batch = subject.encode(instances)
    if knockout is None:
        return decoder.run(batch, answer_mask=answer_mask)
    return run_knockout(decoder, batch, knockout)


def _logits(result):
    return torch.stack([row.answer_logits for row in result.rows])


def _accuracy(subject, instances, result):
    return np.mean([row_record(subject, inst, row)["correct"] for inst, row in zip(instances, result.rows)])


@pytest.mark.parametrize("edge, mask", [("answer->latent", "answer_blind_to_latents"),
                                        ("answer->image", "answer_blind_to_image")])
def test_knockout_at_every_block_equals_the_decoders_key_mask(organisms, held_out, edge, mask):
    """On the LVR organism (no built-in mask), knocking an edge out in every block is what the decoder's own
    2-D key mask for the same edge does (an independent implementation: the mask enters every layer)."""
    subject = organisms("lvr")
    instances = held_out[:8]
    knocked = _decode(subject, instances, AttentionKnockout([edge]))
    masked = _decode(subject, instances, None, answer_mask=mask)
    torch.testing.assert_close(_logits(knocked), _logits(masked), atol=1e-5, rtol=1e-5)
    clean = _decode(subject, instances, None)
    assert (_logits(clean) - _logits(knocked)).abs().max() > 1e-2  # the edge is really read by this organism


@pytest.mark.parametrize("name", ["bottleneck", "shortcut"])
def test_sdpa_and_eager_agree(organisms, held_out, name):
    instances = held_out[:12]
    for knockout in (None, AttentionKnockout(["answer->latent"]), AttentionKnockout(["answer->image", "latent->image"])):
        eager = _decode(organisms(name, "eager"), instances, knockout)
        sdpa = _decode(organisms(name, "sdpa"), instances, knockout)
        torch.testing.assert_close(_logits(eager), _logits(sdpa), atol=2e-4, rtol=1e-4)
        assert [r.text for r in eager.rows] == [r.text for r in sdpa.rows]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_rows_without_a_knockout_are_exactly_the_clean_run(organisms, held_out, attn):
    """Side by side with knocked-out rows, a row without a knockout (and a knockout row at a step where nothing
    is blocked) runs untouched: bitwise the clean run."""
    subject = organisms("lvr", attn)
    instances = held_out[:4]
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    prefill = decoder.prefill(subject.encode(instances))
    clean = decoder.decode(prefill, [None] * (2 * len(instances)), repeats=2)
    knockout = AttentionKnockout(["answer->latent"])
    edits = [None if k % 2 == 0 else knockout.bind(RowBinding(str(k))) for k in range(2 * len(instances))]
    with KnockoutHooks(decoder, edits):
        mixed = decoder.decode(prefill, edits, repeats=2)
    for k in range(0, 2 * len(instances), 2):
        assert torch.equal(mixed.rows[k].answer_logits, clean.rows[k].answer_logits)
        assert torch.equal(mixed.rows[k].latent_vectors, clean.rows[k].latent_vectors)
    for k in range(1, 2 * len(instances), 2):  # latent steps are not answer queries: untouched until the answer
        assert torch.equal(mixed.rows[k].latent_vectors, clean.rows[k].latent_vectors)
        assert not torch.equal(mixed.rows[k].answer_logits, clean.rows[k].answer_logits)


def test_knock_out_masks_both_formats():
    blocked = torch.tensor([[False, True, False], [False, False, False]])
    hidden = torch.zeros(2, 1, 4)
    as_bool = knock_out(torch.ones(2, 1, 1, 3, dtype=torch.bool), blocked, "sdpa", hidden)
    assert as_bool[:, 0, 0].tolist() == [[True, False, True], [True, True, True]]
    additive = knock_out(torch.zeros(2, 1, 1, 3), blocked, "eager", hidden)
    assert additive[0, 0, 0, 1] == torch.finfo(torch.float32).min and additive[1].abs().sum() == 0
    assert knock_out(None, blocked, "sdpa", hidden).dtype == torch.bool
    assert knock_out(None, blocked, "eager", hidden).dtype == torch.float32


def test_organisms_ground_truth(organisms, held_out):
    """bottleneck: answer->latent drops accuracy to chance (0.25), answer->image changes nothing (its answer
    cannot see the image already); shortcut: the reverse."""
    chance = 0.25
    bottleneck, shortcut = organisms("bottleneck"), organisms("shortcut")
    for subject, reads, ignores in ((bottleneck, "answer->latent", "answer->image"),
                                    (shortcut, "answer->image", "answer->latent")):
        clean = _decode(subject, held_out, None)
        untouched = _decode(subject, held_out, AttentionKnockout([ignores]))
        torch.testing.assert_close(_logits(untouched), _logits(clean), atol=1e-5, rtol=1e-5)
        broken = _decode(subject, held_out, AttentionKnockout([reads]))
        correct = int(round(_accuracy(subject, held_out, broken) * len(held_out)))
        interval = binomtest(correct, len(held_out)).proportion_ci(method="exact")
        assert interval.low <= chance <= interval.high, (subject.name, correct)
        assert _accuracy(subject, held_out, clean) > 0.9


def test_knockouts_enter_the_effects_tables(organisms, held_out, tmp_path):
    from latentprobe.runs.intervene import intervene

    subject = organisms("bottleneck")
    summary = intervene(subject, held_out[:8], make_knockouts(["answer->latent", "answer->image"]), tmp_path / "ko",
                        batch_size=8, n_boot=100)
    table = pd.read_parquet(tmp_path / "ko" / "effects_summary.parquet")
    rows = table[table.target == "attention"]
    assert set(rows.intervention) == {"knockout[answer->latent]@layers[all]", "knockout[answer->image]@layers[all]"}
    change = rows.set_index(["intervention", "metric"]).estimate
    assert change[("knockout[answer->image]@layers[all]", "accuracy_change")] == 0
    assert change[("knockout[answer->latent]@layers[all]", "accuracy_change")] < -0.3
    assert summary.n_failed == 0
    from latentprobe.report.patch_figures import knockout_markdown

    assert "knockout[answer->latent]@layers[all]" in knockout_markdown(table)


def test_names_and_parsing():
    assert AttentionKnockout(["answer->image", "latent->image"], layers=[1, 0]).name == \
        "knockout[answer->image+latent->image]@layers[0,1]"
    assert [k.name for k in make_knockouts(["knockout"])] == [
        "knockout[answer->latent]@layers[all]", "knockout[answer->image]@layers[all]",
        "knockout[latent->image]@layers[all]"]
    with pytest.raises(LatentProbeError, match="unknown attention edge"):
        AttentionKnockout(["latent->answer"])
    with pytest.raises(LatentProbeError, match="block index"):
        AttentionKnockout(["answer->latent"], layers=[-1])


@pytest.mark.parametrize("argv, needle", [
    (["--subject", "organism-direct", "--kind", "answer->latent"], "has no latent phase"),
    (["--subject", "organism-bottleneck", "--kind", "answer->latent", "--attention-layers", "1"],
     "block 1 does not exist"),
    (["--subject", "organism-bottleneck", "--kind", "answer->question"], "unknown attention edge"),
])
def test_bad_knockouts_are_one_line_before_any_model_runs(argv, needle, capsys, monkeypatch, tmp_path):
    import latentprobe.model.decoding as decoding

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(decoding.LatentDecoder, "prefill", refuse)
    code = main(["intervene", "--target", "attention", "--out", str(tmp_path / "ko"), "--limit", "2"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
