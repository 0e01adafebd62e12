"""`latentprobe check`: does a checkpoint behave as its family's protocol, prompt and answer format say?

Run it on a real checkpoint (GPU or CPU) before a long run. Each check is one `CheckLine` with a status:
``pass``, ``fail`` (with the fix), ``warn`` (worth knowing, does not fail the check) or ``info`` (what will
run). Any ``fail`` makes the command exit non-zero.

=================== ==========================================================================================
check               what it looks at
=================== ==========================================================================================
load                the folder loads as the family (config, safetensors, tokenizer with the protocol's tokens)
architecture        ``model_type`` is Qwen2.5-VL; the config's vision token ids are the tokenizer's
token <name>        each protocol token: its id, and whether the id the authors' training stored in the config
                    (``latent_start_id``, ``lvr_id``, ...) is the same; tokens added at load are said so
chat template       the prompt renders with the family's system prompt and one image placeholder per image
head                feedback-head weights present or absent as the family expects (LVR: as ``config.lvr_head``)
eos                 the eos ids decoding stops on, against the checkpoint's ``generation_config``
cache vs recompute  one built-in instance decoded with the KV cache; every step's final-norm hidden state and
                    every fed latent vector equal a no-cache recompute of the whole sequence (``replay``)
answer              the output parses with the family's answer parser; the answer slot is found
latent phase        whether, where and how long the instance was in latent mode
layout, stop rule   the protocol that will run (stop rule, steps, fed-back vector, ids written, head)
decoding            the analysis default (greedy) and the authors' settings (``--decoding authors``)
=================== ==========================================================================================

    >>> report = run_check("lvr", "/models/LVR-7B")          # doctest: +SKIP
    >>> print(report.table()); report.ok                      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LatentProbeError

STATUSES = ("pass", "fail", "warn", "info")


@dataclass(frozen=True)
class CheckLine:
    """One row of the check table."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class CheckReport:
    subject: str
    checkpoint: str
    lines: list[CheckLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(line.status == "fail" for line in self.lines)

    @property
    def failures(self) -> list[CheckLine]:
        return [line for line in self.lines if line.status == "fail"]

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.lines.append(CheckLine(name, status, detail, fix))

    def table(self) -> str:
        """One line per check (``STATUS  name  detail``), the fix indented under each failure."""
        width = max(len(line.name) for line in self.lines) if self.lines else 0
        out = []
        for line in self.lines:
            out.append(f"{line.status.upper():<5} {line.name:<{width}}  {line.detail}")
            if line.fix and line.status in ("fail", "warn"):
                out.append(f"{'':<5} {'':<{width}}  fix: {line.fix}")
        n_fail = len(self.failures)
        out.append(f"{'':<5} {'':<{width}}  " + ("all checks passed" if n_fail == 0 else f"{n_fail} check(s) failed"))
        return "\n".join(out)


def run_check(subject_name: str, checkpoint: str | None = None, *, device: str | None = None,
              dtype: str | None = None, max_new_tokens: int = 256, decoding: str = "greedy",
              mediator_markers: Any = None, latent_steps: int | None = None,
              prepare: Callable[[Any], Any] | None = None) -> CheckReport:
    """Check ``checkpoint`` against family ``subject_name``; returns the report (nothing raised for a failure).

    ``prepare(subject)`` may return a context manager active while the instance is decoded (tests use it to
    script a stand-in's outputs).
    """
    from ..model.subjects import SUBJECTS, load_subject

    report = CheckReport(subject=subject_name, checkpoint=str(checkpoint or ""))
    kwargs = {"checkpoint": checkpoint} if checkpoint else {}
    try:
        subject = load_subject(subject_name, device=device, dtype=dtype, mediator_markers=mediator_markers, **kwargs)
    except LatentProbeError as exc:
        report.add("load", "fail", exc.problem, exc.fix or "")
        return report
    spec = SUBJECTS.get(subject_name)
    report.add("load", "pass", f"{subject.checkpoint} as {subject.name} ({subject.num_layers} layers, "
                               f"hidden {subject.hidden_size}, {next(subject.model.parameters()).dtype})")
    _architecture(report, subject)
    _tokens(report, subject, spec)
    _chat_template(report, subject, spec)
    _head(report, subject)
    _eos(report, subject)
    _authors_ids(report, subject, spec)
    _decode_checks(report, subject, max_new_tokens, latent_steps, prepare)
    _protocol(report, subject, latent_steps)
    _decoding(report, subject, decoding)
    report.add("scope", "info", CHECK_SCOPE)
    return report


# What `check` covers, said in every report (a PASS means these, and nothing else, were verified).
CHECK_SCOPE = ("checks any registered subject (the families monet, lvr, mirage, capimagine, qwen2.5-vl, the tiny "
               "subject and the organisms): its tokens, chat template, head and eos, and one built-in instance "
               "decoded with the cache against a no-cache recompute under the same attention masks (an "
               "organism's answer mask included); it does not check accuracy, sampling, or other instances")


# ----------------------------------------------------------------------------------------------- static checks

def _check_instance(subject):
    """The built-in instance a check decodes: an image question, or a text one for a text-only subject (the
    subject's own first held-out question when its registry entry names its data: a text organism)."""
    from ..data.instances import builtin_instances, builtin_text_instances
    from ..model.subjects import SUBJECTS

    spec = SUBJECTS.get(subject.name)
    if subject.text_only and spec is not None and spec.default_data is not None:
        return spec.default_instances(limit=1)[0][0]
    return (builtin_text_instances(1) if subject.text_only else builtin_instances(1))[0]


def _architecture(report: CheckReport, subject) -> None:
    config = subject.model.config
    arch = ", ".join(getattr(config, "architectures", None) or ["(none listed)"])
    if subject.text_only:  # the loader admitted only a registered text backbone
        rows = subject.model.get_input_embeddings().weight.shape[0]
        report.add("architecture", "pass", f"{config.model_type} ({arch}), text-only: 1-D positions, no image "
                                           f"group; {rows} embedding rows for {len(subject.tokenizer)} tokens")
        return
    if config.model_type != "qwen2_5_vl":
        report.add("architecture", "fail", f"model_type {config.model_type!r} ({arch})",
                   "latentprobe's families are Qwen2.5-VL fine-tunes; point at the Qwen2.5-VL checkpoint")
        return
    vocab = subject.tokenizer.get_vocab()
    wrong = [f"{attr}={getattr(config, attr, None)} but {token} is {vocab.get(token)}"
             for attr, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"))
             if getattr(config, attr, None) != vocab.get(token)]
    if wrong:
        report.add("architecture", "fail", "; ".join(wrong),
                   "the config and tokenizer come from different checkpoints; copy both from the same folder")
        return
    rows = subject.model.get_input_embeddings().weight.shape[0]
    report.add("architecture", "pass", f"qwen2_5_vl ({arch}); {rows} embedding rows for {len(vocab)} tokens")


def _tokens(report: CheckReport, subject, spec) -> None:
    proto = subject.protocol
    if proto is None:
        report.add("protocol tokens", "info", "no latent protocol (plain decoding)")
        return
    vocab = subject.tokenizer.get_vocab()
    stored = getattr(spec, "config_token_ids", {}) or {}
    rows = subject.model.get_input_embeddings().weight.shape[0]
    added = set(subject.added_tokens)
    for token in proto.token_strings:
        token_id = vocab.get(token)
        name = f"token {token}"
        if token_id is None:  # cannot happen after a successful load; kept for subjects built otherwise
            report.add(name, "fail", "missing from the tokenizer", "load the checkpoint this family belongs to")
            continue
        note = " (added at load, as the authors' inference does)" if token in added else ""
        if token_id >= rows:
            report.add(name, "fail", f"id {token_id} has no embedding row (the model has {rows})",
                       "the tokenizer and weights come from different checkpoints")
            continue
        attribute = stored.get(token)
        config_id = getattr(subject.model.config, attribute, None) if attribute else None
        if attribute is None:
            report.add(name, "pass", f"id {token_id}{note}; the authors' config stores no id for it")
        elif config_id is None:
            report.add(name, "warn", f"id {token_id}{note}; config.{attribute} is absent",
                       f"the authors' training writes config.{attribute}; check this is their checkpoint")
        elif int(config_id) != token_id:
            report.add(name, "fail", f"id {token_id}{note} but config.{attribute} = {config_id}",
                       "the tokenizer does not match the weights' training; use the tokenizer saved with the "
                       "checkpoint (or add the tokens in the authors' order)")
        else:
            report.add(name, "pass", f"id {token_id}{note} = config.{attribute}")


def _chat_template(report: CheckReport, subject, spec) -> None:
    instance = _check_instance(subject)
    if subject.prompt_style.plain:
        prompt = subject.prompt_text(instance)
        start = subject.protocol.start_token if subject.prompt_style.force_latent_start else ""
        ok = prompt.endswith(start) and instance.question.strip() in prompt
        report.add("chat template", "pass" if ok else "fail",
                   f"no chat turn: the question itself{' then ' + start if start else ''}, as the family's "
                   f"evaluation feeds it ({len(prompt)} characters)",
                   "" if ok else "the prompt does not hold the question and the forced start token")
        return
    if not subject.tokenizer.chat_template:
        report.add("chat template", "fail", "the tokenizer has no chat template",
                   "copy chat_template.json (or tokenizer_config.json's chat_template) from "
                   "Qwen/Qwen2.5-VL-7B-Instruct into the checkpoint folder")
        return
    try:
        prompt = subject.prompt_text(instance)
    except Exception as exc:  # noqa: BLE001 - a template error of any kind is this check's finding
        report.add("chat template", "fail", f"rendering failed: {type(exc).__name__}: {exc}",
                   "use the chat template of Qwen/Qwen2.5-VL-7B-Instruct")
        return
    style = subject.prompt_style
    system = style.system_prompt
    problems = []
    if system:
        if f"system\n{system}" not in prompt:
            problems.append("the family's system prompt is not in the rendered prompt")
        label = f"system prompt {system[:40]!r}{'...' if len(system) > 40 else ''}"
    elif system == "":
        if "<|im_start|>system" in prompt:
            problems.append("a system turn is rendered though the family has none")
        label = "no system turn"
    else:
        if "<|im_start|>system" not in prompt:
            problems.append("the template's default system turn is missing")
        label = "the template's default system prompt"
    n_images = prompt.count("<|image_pad|>")
    if n_images != len(instance.images):
        problems.append(f"{n_images} image placeholders for {len(instance.images)} image(s)")
    opening = style.generation_prompt if style.generation_prompt is not None else "<|im_start|>assistant\n"
    if not (prompt.endswith(opening + style.assistant_prefix) or style.force_latent_start):
        problems.append(f"the prompt does not end with the assistant opening {opening!r}")
    if problems:
        report.add("chat template", "fail", "; ".join(problems),
                   "use the chat template of Qwen/Qwen2.5-VL-7B-Instruct (the families' prompts assume it)")
    else:
        report.add("chat template", "pass", f"renders with {label}; assistant opens with {opening!r}")


def _head(report: CheckReport, subject) -> None:
    proto = subject.protocol
    prefix = proto.head_module if proto is not None else None
    keys = _weight_keys(Path(subject.checkpoint)) if subject.checkpoint else []
    if prefix is None:
        strays = sorted({k.split(".")[0] for k in keys if k.split(".")[0].endswith("_head") and k.split(".")[0] != "lm_head"})
        if strays:
            report.add("head", "warn", f"weights {', '.join(strays)}.* are in the checkpoint but this family feeds "
                                       "back no head", "check the --subject/--protocol matches the checkpoint")
        else:
            report.add("head", "pass", "no feedback head expected, none present")
        return
    head_keys = [k for k in keys if k.startswith(prefix + ".") or k.startswith("model." + prefix + ".")]
    declared = getattr(subject.model.config, prefix, None)  # LVR writes config.lvr_head
    attached = hasattr(subject.model, prefix)
    detail = f"{len(head_keys)} {prefix}.* weights; config.{prefix} = {declared}; attached: {attached}"
    if declared is not None and bool(declared) != bool(head_keys):
        report.add("head", "fail", detail, f"config.{prefix} says {'a' if declared else 'no'} head but the weights "
                   f"{'lack' if declared else 'hold'} one; the checkpoint is incomplete or mislabelled")
    elif bool(head_keys) != attached:
        report.add("head", "fail", detail, "the head weights were not loaded; see the load error above")
    else:
        report.add("head", "pass", detail)


def _authors_ids(report: CheckReport, subject, spec) -> None:
    """Ids the authors' own code hard-codes (ILVR's generate loop) or places at the vocabulary's end (CODI)."""
    vocab = subject.tokenizer.get_vocab()
    fixed = getattr(spec, "authors_fixed_ids", None) or {}
    if fixed:
        differ = [f"{token} = {vocab.get(token)} (hard-coded {value})" for token, value in fixed.items()
                  if vocab.get(token) != value]
        if differ:
            report.add("authors' fixed ids", "warn", "; ".join(differ),
                       "latentprobe reads the ids from the tokenizer; the authors' own generate loop would not "
                       "recognise these tokens, so their published runs used other ids")
        else:
            report.add("authors' fixed ids", "pass", "the tokenizer's ids are the ones the authors' code hard-codes")
    trailing = getattr(spec, "trailing_token_ids", ()) or ()
    if trailing:  # the loader refuses a folder where they are not (this line says so when it loaded)
        rows = subject.model.get_input_embeddings().weight.shape[0]
        report.add("authors' fixed ids", "pass", f"{', '.join(trailing)} are the last {len(trailing)} of {rows} "
                                                 "embedding rows, as the authors' code defines them")


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def _eos(report: CheckReport, subject) -> None:
    used = list(subject.eos_token_ids)
    listed = _generation_config_eos(Path(subject.checkpoint)) if subject.checkpoint else []
    names = ", ".join(f"{subject.tokenizer.convert_ids_to_tokens(i)}={i}" for i in used)
    missing = [i for i in listed if i not in used]
    if missing:
        report.add("eos", "warn", f"stops on {names}; generation_config also lists {missing}",
                   "generate would stop there too: decoding may run past what the authors' generate returned")
    else:
        report.add("eos", "pass", f"stops on {names}" + (" (as generation_config)" if listed else ""))


def _generation_config_eos(folder: Path) -> list[int]:
    import json

    path = folder / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


# -------------------------------------------------------------------------------------------- decoding checks

def _decode_checks(report: CheckReport, subject, max_new_tokens: int, latent_steps: int | None, prepare) -> None:
    import contextlib

    from ..model.backbones import backbone_module
    from ..model.decoding import DecodeConfig, LatentDecoder

    instance = _check_instance(subject)
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=max_new_tokens, latent_steps=latent_steps))
    hidden_log: list[torch.Tensor] = []
    mask_log: list[torch.Tensor] = []

    def keep_hidden(module, args, kwargs, output):
        if kwargs.get("use_cache", True) is not False:  # decoding steps, not the recompute
            state = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            hidden_log.append(state[:, -1].detach().float().cpu())
            mask = kwargs.get("attention_mask")  # the key mask each step ran with (an organism's answer mask too)
            mask_log.append(None if mask is None else mask.detach().cpu())

    context = prepare(subject) if prepare is not None else contextlib.nullcontext()
    handle = backbone_module(subject.model).register_forward_hook(keep_hidden, with_kwargs=True)
    try:
        with context:
            batch = subject.encode([instance])
            try:
                result = decoder.run(batch)
            except Exception as exc:  # noqa: BLE001 - any failure to decode is this check's finding
                report.add("decode", "fail", f"{type(exc).__name__}: {exc}",
                           "the checkpoint cannot be decoded as this family; check --subject and the folder")
                return
            row = result.rows[0]
            try:
                _cache_vs_recompute(report, subject, decoder, batch, result, hidden_log, mask_log)
            except Exception as exc:  # noqa: BLE001 - the recompute failing is this check's finding
                report.add("cache vs recompute", "fail", f"the no-cache recompute failed: {type(exc).__name__}: "
                                                         f"{exc}", "report it with this table and the decoded text")
    finally:
        handle.remove()
    _answer(report, subject, instance, row, max_new_tokens)
    _latent_phase(report, subject, row)


def _cache_vs_recompute(report, subject, decoder, batch, result, hidden_log, mask_log=None) -> None:
    """Every cached step's final-norm state, and every fed latent, against one no-cache forward of the sequence.

    A subject whose protocol masks attention in its answer (the organisms' ``answer_mask``) decodes each answer
    step with keys hidden; the recompute then uses the same per-step key masks as one 4D mask (a recompute with
    the plain padding mask would differ by design: the false alarm "max relative error 0.22" of round three).
    """
    from ..model.decoding import LATENT, replay

    row = result.rows[0]
    n_steps = len(row.generated_ids)
    four_d = None
    if getattr(subject.protocol, "answer_mask", None) and mask_log:
        four_d = _step_masks_as_4d(result, mask_log[: n_steps], next(subject.model.parameters()).dtype)
    recomputed = replay(subject, batch, result, attention_mask=four_d).float().cpu()[0]  # (L + T, D)
    start = result.prompt_length - 1  # the prompt's last position, then one position per step that ran
    cached = torch.cat(hidden_log, dim=0)[: n_steps]  # prefill's last state, then each decoding step's
    reference = recomputed[start: start + len(cached)]
    scale = reference.norm(dim=-1).clamp(min=1e-6)
    hidden_error = float(((cached - reference).norm(dim=-1) / scale).max()) if len(cached) else 0.0
    latent_error = 0.0
    steps = [j for j, kind in enumerate(row.step_kinds) if kind == LATENT]
    positions = [result.prompt_length + j for j in steps]
    if positions:
        previous = recomputed[[p - 1 for p in positions]].to(next(subject.model.parameters()))
        # the head maps a state computed at a latent position only (LVR never maps z_0); CODI's maps every one
        maps_first = subject.protocol.head_maps_first
        at_latent = torch.tensor([maps_first or (j > 0 and row.step_kinds[j - 1] == LATENT)
                                  for j in steps]).unsqueeze(-1)
        with torch.no_grad():
            mapped = decoder._feedback(previous).float().cpu()
        expected = torch.where(at_latent, mapped, previous.float().cpu())
        latent_error = float(((row.latent_vectors.float() - expected).norm(dim=-1)
                              / expected.norm(dim=-1).clamp(min=1e-6)).max())
    dtype = next(subject.model.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    detail = (f"{n_steps} steps, {len(positions)} latent: max relative error {hidden_error:.1e} (hidden), "
              f"{latent_error:.1e} (fed latents); tolerance {tolerance:.0e} for {dtype}")
    if hidden_error <= tolerance and latent_error <= tolerance:
        report.add("cache vs recompute", "pass", detail)
    else:
        report.add("cache vs recompute", "fail", detail,
                   "cached decoding disagrees with a no-cache recompute: try --dtype float32 and the eager "
                   "attention; if it persists, report it with this table")


def _step_masks_as_4d(result, step_masks, dtype) -> torch.Tensor:
    """One additive (B, 1, T, T) mask for a no-cache forward: causal, the prompt's padding for prompt queries, and
    for the query of each decoding step exactly the key mask that step ran with."""
    padding = result.attention_mask.bool()
    bsz, length = padding.shape
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)).unsqueeze(0).repeat(bsz, 1, 1)
    allowed &= padding.unsqueeze(1)
    start = result.prompt_length - 1  # the prefill's last position; step j's query is start + j
    for j, mask in enumerate(step_masks[1:], start=1):
        if mask is None or mask.dim() != 2:
            continue
        query = start + j
        if query >= length:
            break
        keys = mask.bool()[:, : query + 1]
        allowed[:, query, : keys.shape[1]] &= keys
    blocked = torch.finfo(dtype).min
    return torch.zeros(bsz, 1, length, length, dtype=dtype).masked_fill(~allowed.unsqueeze(1), blocked)


def _answer(report: CheckReport, subject, instance, row, max_new_tokens: int) -> None:
    from .common import row_record

    record = row_record(subject, instance, row)
    shown = row.text if len(row.text) <= 60 else "..." + row.text[-57:]
    if record["answer_status"] == "unparsable":
        report.add("answer", "fail", f"{subject.answer_parser!r} finds no answer in {shown!r} "
                                     f"(stop: {row.stop_reason or '?'})",
                   f"the family writes its answer in its own format; if the output was cut, raise "
                   f"--max-new-tokens (now {max_new_tokens}); else check --subject and the prompt")
    else:
        report.add("answer", "pass", f"{subject.answer_parser!r} reads {record['parsed_answer']!r} from {shown!r} "
                                     f"({record['answer_status']}; gold {instance.gold_letter})")
    slot = getattr(row, "answer_slot", None)  # found / forced, where the decoder reports it
    if row.answer_logits is not None:
        how = f" ({slot})" if slot else ""
        report.add("answer slot", "pass", f"found{how}: gold probability {record['gold_prob']:.3f} over the options")
    else:
        report.add("answer slot", "fail", f"no answer slot in this output{f' ({slot})' if slot else ''}",
                   "gold_prob and KL need the position where the answer is written; check the family's "
                   "answer format and the mediator markers")
    if subject.text_mediator_markers:
        span = subject.mediator_span(row.raw_text)
        open_marker, close_marker = subject.text_mediator_markers
        if span is None:
            report.add("mediator markers", "fail", f"no {open_marker} in the output",
                       "pass the markers this checkpoint writes: --mediator-markers OPEN,CLOSE")
        else:
            closed = close_marker in row.raw_text
            report.add("mediator markers", "pass" if closed else "fail",
                       f"{open_marker}...{close_marker}: {len(span)} characters of imagination"
                       + ("" if closed else f", never closed by {close_marker}"),
                       "" if closed else "pass the close marker this checkpoint writes: --mediator-markers OPEN,CLOSE")


def _latent_phase(report: CheckReport, subject, row) -> None:
    if subject.protocol is None:
        return
    if row.entered_latent:
        report.add("latent phase", "info", f"entered at generated position {row.latent_start}, "
                                           f"{row.n_latent_steps} steps in {len(row.latent_segments)} segment(s)"
                                           + (" (start forced by the prompt)" if row.forced_start else ""))
    else:
        report.add("latent phase", "warn", "this instance never entered latent mode",
                   "not an error (users report Monet often does not enter it); every trace row records whether "
                   "it did")


def _protocol(report: CheckReport, subject, latent_steps: int | None) -> None:
    proto = subject.protocol
    if proto is None:
        mediator = (f"text mediator between {subject.text_mediator_markers[0]} and {subject.text_mediator_markers[1]}"
                    if subject.text_mediator_markers else "no mediator")
        report.add("layout, stop rule", "info", f"plain decoding; {mediator}")
        return
    steps = latent_steps if latent_steps is not None else proto.num_steps
    rule = (f"exactly {steps} latent steps" if proto.stop_rule == "fixed"
            else f"until the model chooses {proto.end_token}, at most {steps} steps")
    layout = getattr(proto, "layout", None)
    fed = "final-norm last hidden state" + (f" through {proto.head_module}" if proto.head_module and
                                            hasattr(subject.model, proto.head_module) else "")
    if proto.head_maps_first and hasattr(subject.model, proto.head_module or ""):
        fed += " (the first one too)"
    if proto.never_in_text:
        fed += f"; never chosen outside latent mode: {', '.join(proto.never_in_text)}"
    ids = "pad ids written" if proto.write_pad_ids else "the model's own ids kept"
    report.add("layout, stop rule", "info", f"{proto.name}: {rule}; fed back: {fed}; {ids}"
                                            + (f"; layout {layout}" if layout else ""))


def _decoding(report: CheckReport, subject, decoding: str) -> None:
    from ..model.subjects.families import decoding_preset

    settings = subject.authors_settings or {}
    shown = {k: v for k, v in settings.items() if k != "source"}
    if decoding == "authors":
        applied, ignored = decoding_preset(subject, "authors")
        detail = f"authors' settings {applied}" + (f" from {settings['source']}" if settings.get("source") else "")
        if ignored:
            report.add("decoding", "warn", detail + f"; not applied: {ignored}",
                       "latentprobe's decoder does not implement these; results may differ slightly from the "
                       "authors' runs")
        else:
            report.add("decoding", "info", detail)
    else:
        report.add("decoding", "info", "greedy (the analysis default)"
                   + (f"; the authors' settings with --decoding authors: {shown}" if shown else ""))
