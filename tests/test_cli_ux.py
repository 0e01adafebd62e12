"""The command line as a researcher uses it: every run kind in the report, no silent overwrite, short errors with
suggestions, real defaults in --help, progress in logs, the data cache, and the notebook path."""

import warnings

import pandas as pd
import pytest

from latentprobe.cli import SCALE_DEFAULTS, build_parser, main, print_block
from latentprobe.errors import LatentProbeError


@pytest.fixture(scope="module")
def transform_data(tmp_path_factory):
    from latentprobe.data.tasks import make_task

    return make_task("transform", n=8, seed=0, out_dir=tmp_path_factory.mktemp("transform"), image_size=112)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, transform_data):
    """One folder of every kind `report` reads, from the tiny subject on 4 instances (seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--subject", "tiny", "--data", str(transform_data), "--limit", "4", "--max-new-tokens", "8"]
    made = {}
    for kind, extra in (("trace", ["--layers", "all", "--quiet"]),
                        ("intervene", ["--target", "latent", "--kind", "noise,patch", "--bootstrap", "100", "--quiet"]),
                        ("patch", ["--layers", "0,2", "--bootstrap", "100", "--quiet"]),
                        ("ground", ["--layers", "0,2", "--overlays", "1", "--bootstrap", "100"]),
                        ("lens", ["--layers", "0,2"])):
        made[kind] = root / kind
        assert main([kind] + common + extra + ["--out", str(made[kind])]) == 0, kind
    return made


def test_report_reads_every_run_kind_into_its_section(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--out", str(out), "--bootstrap", "100"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    for kind in runs:
        assert f"\n{kind:<9} {runs[kind]}" in printed
    # the long steps say when they finish (issue 22): each subject's collapse and probes, then the rest
    assert "report    tiny        collapse and probes (" in captured.err
    assert "report    effects, figures and verdicts (" in captured.err
    text = (out / "report.md").read_text()
    assert "Activation patching: tiny" in text and "Grounding: tiny" in text and "Lens: tiny" in text
    assert text.index("## Where and when") < text.index("## Appendix")
    # the appendix lists every run with its kind and what it holds, paths relative to the report
    for kind in runs:
        assert f"| {kind} | tiny | 4 / 4 |" in text, kind
    provenance = [line for line in text.splitlines() if line.startswith("| ") and "| tiny | 4 / 4 |" in line]
    assert len(provenance) == 5 and not any(line.startswith("| /") for line in provenance)


def test_report_refuses_an_existing_folder_and_overwrite_leaves_nothing_stale(runs, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "probes.csv").write_text("stale")
    assert main(["report", str(runs["intervene"]), "--out", str(out), "--bootstrap", "100"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "probes.csv").read_text() == "stale"
    assert main(["report", str(runs["intervene"]), "--out", str(out), "--overwrite", "--bootstrap", "100"]) == 0
    assert not (out / "probes.csv").exists() and (out / "report.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # no staging folder left behind
    # a report folder that holds its own inputs is never replaced
    assert main(["report", str(runs["trace"]), "--out", str(runs["trace"].parent), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err and runs["trace"].exists()


def test_report_refuses_a_folder_no_command_wrote(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["report", str(tmp_path / "notes"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "holds no latentprobe run" in err and "trace, intervene, patch, ground, lens" in err
    assert not (tmp_path / "r").exists()


def test_patch_refuses_to_write_over_a_run(runs, capsys):
    assert main(["patch", "--subject", "tiny", "--out", str(runs["patch"])]) == 2
    assert "already holds a patch run" in capsys.readouterr().err  # its own run: the hint is --resume


def test_mistyped_flags_commands_and_subjects_get_the_closest_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trace", "--limt", "3", "--out", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--limt (did you mean --limit?)" in err and len(err.splitlines()) == 2
    assert err.startswith("usage: latentprobe trace [options]")
    with pytest.raises(SystemExit):
        main(["tarce"])
    assert "(did you mean trace?)" in capsys.readouterr().err
    assert main(["trace", "--subject", "organism-bottlenek", "--out", "x"]) == 2
    assert "did you mean organism-bottleneck?" in capsys.readouterr().err
    assert main(["subjects", "--show", "lvrr"]) == 2
    assert "did you mean lvr?" in capsys.readouterr().err


def test_a_bad_value_gets_two_lines_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit):
        main(["intervene", "--target", "latent", "--kind", "noise", "--scale", "nan", "--out", "x"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "argument --scale: 'nan' is not a finite number" in err[1]


def test_help_shows_real_defaults_and_none_for_required_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, child in sub.choices.items():
        text = child.format_help()
        assert "(default: None)" not in text and "(default: )" not in text, name
        for action in child._actions:
            if action.required and action.help:
                assert "(default:" not in child._get_formatter()._expand_help(action), (name, action.dest)
    from latentprobe.interventions import make_interventions

    # --scale's help states what each kind runs with when it is not given
    for kind, value in SCALE_DEFAULTS.items():
        target = "latent" if kind in ("noise", "drop") else ("text" if kind.startswith("text") else "input")
        made = make_interventions(target, [kind], seed=0)[0]
        assert value == next(v for k, v in vars(made).items() if k in ("scale", "level", "fraction", "keep")), kind


def test_result_blocks_keep_lines_whole_and_rules_within_100_columns(capsys):
    long = "warning   " + "x" * 150
    print_block("title", ["short", long])
    out = capsys.readouterr().out.splitlines()
    assert long in out and len(out[0]) == 100  # a warning stays one line for grep; the rule stops at 100


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    import latentprobe.runs.common as common

    clock = iter([0.0, 40.0, 41.0, 90.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    bar = common.LineProgress(10, "trace")
    bar.update(4)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err == ["trace: 4/10 instances (40%), 40 s", "trace: 5/10 instances (50%), 90 s"]


def test_cache_command_lists_and_clears_only_its_own_entries(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATENTPROBE_CACHE", str(tmp_path))
    (tmp_path / "organism-data" / "x").mkdir(parents=True)
    (tmp_path / "organism-data" / "x" / "data.jsonl").write_text("{}" * 600)
    (tmp_path / "my-notes.txt").write_text("keep")
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "organism-data" in out and "1.2 kB" in out and "my-notes" not in out
    assert main(["cache", "--clear"]) == 0
    assert not (tmp_path / "organism-data").exists() and (tmp_path / "my-notes.txt").read_text() == "keep"


def test_one_rule_for_default_instance_counts():
    from latentprobe.data.loading import DEFAULT_INSTANCES, default_limit
    from latentprobe.study.demo import DEMO_N_INSTANCES
    from latentprobe.where.runs import DEFAULT_LIMIT

    assert DEFAULT_INSTANCES == DEMO_N_INSTANCES == DEFAULT_LIMIT == 80
    assert default_limit(None, None) == 80 and default_limit("data.jsonl", None) is None
    assert default_limit(None, 5) == 5
    # a study follows it too: the first 80 of the subject's own data (here the 8 built-in images, all of them)
    from latentprobe.study import StudyConfig
    from latentprobe.study.run import study_instances

    instances, source = study_instances(StudyConfig(subjects=["tiny"]), "tiny")
    assert source == "builtin" and len(instances) == 8
    assert len(study_instances(StudyConfig(subjects=["tiny"], n_instances=3), "tiny")[0]) == 3


def test_the_notebook_path(tiny_subject):
    import latentprobe as lp
    from latentprobe.model.cache import run_with_cache
    from latentprobe.model.conditions import ConditionWarning

    held_out = lp.organism_data("bottleneck", 3)
    assert [i.split for i in held_out] == ["test"] * 3 and held_out == lp.organism_data("organism-bottleneck", 3)
    with pytest.raises(LatentProbeError, match="did you mean bottleneck"):
        lp.organism_data("botleneck")
    subject = lp.load_subject("organism-bottleneck")
    assert "\n" not in repr(subject) and len(repr(subject)) < 250 and "protocol=bottleneck" in repr(subject)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_with_cache(subject, lp.builtin_instances(2))  # 56-px colour squares: not what it was trained on
    assert any(issubclass(w.category, ConditionWarning) and "112x112" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConditionWarning)
        _, cache = run_with_cache(subject, held_out[:2])  # its own data: no warning
    assert cache["latent[3].layer[0]"].shape[0] == 2
    with pytest.raises(LatentProbeError, match=r"no instance reached latent\[5\].layer\[0\]: these rows ran at most 4"):
        cache["latent[5].layer[0]"]


def test_subjects_show_prints_the_protocol_and_the_organisms_facts(capsys):
    assert main(["subjects", "--show", "organism-lvr"]) == 0
    out = capsys.readouterr().out
    for needle in ("protocol.start_token", "<|lvr_start|>", "protocol.num_steps", "112 x 112 px",
                   "held-out split of 600", "ground_truth"):
        assert needle in out, needle
    assert max(len(line) for line in out.splitlines()) <= 100


def test_the_readout_commands_run_from_the_command_line(tmp_path, transform_data, capsys):
    # step-influence and decodability as a new user types them (they once failed before any work on a missing
    # --shard option that only the sharding commands define)
    common = ["--subject", "tiny", "--data", str(transform_data), "--limit", "4", "--max-new-tokens", "8"]
    assert main(["step-influence", *common, "--kind", "mean", "--bootstrap", "100",
                 "--out", str(tmp_path / "influence")]) == 0
    assert "placebo-corrected R2" in capsys.readouterr().out
    traced = tmp_path / "trace"
    assert main(["trace", *common, "--layers", "all", "--answer-states", "--quiet", "--out", str(traced)]) == 0
    assert main(["decodability", str(traced), "--out", str(tmp_path / "decode"), "--folds", "2",
                 "--bootstrap", "100"]) == 0
    assert "gap after - at" in capsys.readouterr().out
