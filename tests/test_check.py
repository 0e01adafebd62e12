"""`latentprobe check` on stand-in checkpoints of every family: passes where the checkpoint conforms, fails with a
fix where it does not."""

import pytest

from latentprobe.cli import main
from latentprobe.runs.conformance import CheckLine, run_check

from standins import FAMILIES, build_standin, scripted

# Lines that depend on what the model writes (a random stand-in writes noise unless scripted).
OUTPUT_DEPENDENT = {"answer", "answer slot", "mediator markers", "latent phase"}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return {family: build_standin(family, root / family) for family in FAMILIES}


def by_name(report):
    return {line.name: line for line in report.lines}


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes_on_each_scripted_standin(standins, family):
    report = run_check(family, str(standins[family]), max_new_tokens=64,
                       prepare=lambda subject: scripted(subject, family))
    lines = by_name(report)
    failed = {line.name for line in report.failures}
    if family == "capimagine":
        # </think_image> is several tokens: only the per-family answer-prefix rule (decoder branch) finds its slot
        assert failed <= {"answer slot"}
    else:
        assert report.ok, report.table()
    assert lines["cache vs recompute"].status == "pass"
    assert lines["answer"].status == "pass" and "'B'" in lines["answer"].detail
    assert lines["chat template"].status == "pass"
    if family in ("monet", "lvr", "mirage"):
        tokens = [line for line in report.lines if line.name.startswith("token ")]
        assert tokens and all(line.status == "pass" for line in tokens)
        assert lines["latent phase"].status == "info" and "steps" in lines["latent phase"].detail
    if family == "mirage":
        assert "added at load" in lines["token <|latent_start|>"].detail
    if family == "capimagine":
        assert lines["mediator markers"].status == "pass" and "<think_image>" in lines["mediator markers"].detail
    table = report.table()
    assert table.count("\n") >= len(report.lines) and ("all checks passed" in table) == report.ok


@pytest.mark.parametrize("family", ["lvr", "qwen2.5-vl"])
def test_check_command_prints_the_table_and_fails_on_noise(standins, family, capsys):
    """Unscripted, the random stand-in writes noise: the command prints the whole table and exits 1, and only
    the lines about what the model wrote fail."""
    code = main(["check", "--subject", family, "--checkpoint", str(standins[family]), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  answer" in out and "fix:" in out and "check(s) failed" in out
    failing = [line.split()[1] for line in out.splitlines() if line.startswith("FAIL")]
    assert set(failing) <= {"answer"}  # "answer" and "answer slot" both start with it
    assert "PASS  cache vs recompute" in out and "PASS  architecture" in out


def test_config_ids_that_disagree_with_the_tokenizer_fail_with_a_fix(tmp_path):
    folder = build_standin("lvr", tmp_path / "lvr", config_ids_offset=1)
    report = run_check("lvr", str(folder), max_new_tokens=32, prepare=lambda s: scripted(s, "lvr"))
    token_lines = [line for line in report.lines if line.name.startswith("token ")]
    assert len(token_lines) == 4 and all(line.status == "fail" for line in token_lines)
    assert "config.lvr_start_id" in by_name(report)["token <|lvr_start|>"].detail
    assert all("tokenizer" in line.fix for line in token_lines)
    assert not report.ok


def test_missing_chat_template_and_wrong_family_fail(tmp_path, capsys):
    folder = build_standin("qwen2.5-vl", tmp_path / "bare", chat_template=False)
    report = run_check("qwen2.5-vl", str(folder), max_new_tokens=2)
    line = by_name(report)["chat template"]
    assert line.status == "fail" and "chat_template" in line.fix
    lvr = build_standin("lvr", tmp_path / "lvr")
    assert main(["check", "--subject", "monet", "--checkpoint", str(lvr)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  load" in out and "lacks the monet protocol's token" in out and "fix:" in out


def test_lvr_head_declared_in_config_must_be_in_the_weights(tmp_path):
    with_head = build_standin("lvr", tmp_path / "head", lvr_head=True)
    import json

    config = json.loads((with_head / "config.json").read_text())
    assert config["lvr_head"] is True
    # the head is there and declared: consistent; the head weights are dropped: the config now lies
    from safetensors.torch import load_file, save_file

    weights = load_file(str(with_head / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("lvr_head.")},
              str(with_head / "model.safetensors"), metadata={"format": "pt"})
    report = run_check("lvr", str(with_head), max_new_tokens=2)
    head = by_name(report)["head"]
    assert head.status == "fail" and "config.lvr_head" in head.fix


def test_decoding_authors_line_names_what_is_not_applied(standins):
    report = run_check("monet", str(standins["monet"]), max_new_tokens=2, decoding="authors")
    line = by_name(report)["decoding"]
    assert line.status == "warn" and "repetition_penalty" in line.detail and "temperature': 0.1" in line.detail


def test_check_line_rejects_unknown_status():
    with pytest.raises(ValueError):
        CheckLine("x", "maybe", "")


def test_cache_vs_recompute_passes_with_lvrs_head(tmp_path):
    """The head maps states computed at latent positions only (never z_0): the recompute's expectation agrees."""
    with_head = build_standin("lvr", tmp_path / "head", lvr_head=True)
    report = run_check("lvr", str(with_head), max_new_tokens=64, prepare=lambda subject: scripted(subject, "lvr"))
    line = by_name(report)["cache vs recompute"]
    assert line.status == "pass", line.detail
    assert by_name(report)["head"].status == "pass"
