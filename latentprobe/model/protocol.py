"""Latent protocols: declarative descriptions of how a model family reasons in latent space.

A protocol names the special tokens (as strings, resolved to ids from the tokenizer), the stop rule and
what is fed back. It holds no logic about decoding; the `LatentDecoder` reads it.

Stop rules
    ``fixed``      exactly ``num_steps`` latent vectors, then the exit rule (LVR).
    ``end_token``  latent mode lasts until the model's own choice at a latent step is the end token, or
                   ``num_steps`` latent vectors were fed (the cap), then the exit rule (Monet, Mirage).

Exit rules (what follows the last latent step when the count ends the phase)
    ``force_end``     the end token is written and fed (Monet's runner at its quota; Mirage at its cap).
    ``model_choice``  the model's own choice after the last latent step is fed (LVR's ``_lvr_deocding_by_steps``:
                      in practice ``<|lvr_latent_end|>`` then ``<|lvr_end|>``); the decoder records it.

Layouts (where latent step 0 sits)
    ``training``   the start token is embedded and fed like text; latent step 0 is the position after it and
                   z_0 = h(start) (Mirage, LVR, Monet's training code).
    ``inference``  the start token's embedding is never fed: the hidden state that chose the start token is fed
                   at the start token's own position, which is latent step 0 (Monet's vLLM runner,
                   ``inference/vllm/monet_gpu_model_runner.py``). z_k is then the state that chose the token
                   written at step k, and the cap counts the vector at the start position.

Feedback: the last layer's hidden state after the final norm at the last position, optionally mapped through
a head module of the checkpoint (LVR's optional ``LVRHead``; CODI's projection ``prj``), is the next step's input
embedding. LVR maps only states computed at latent positions; CODI maps the first one too (``head_maps_first``).

Text constraints: ``never_in_text`` names tokens the model is never allowed to choose outside latent mode (ILVR's
``LatentTemplateLogitsProcessor`` bans its pad and end tokens there; CODI cuts its eot id from the logits).

Two protocols may share token strings and differ in rules: ILVR and Mirage both use ``<|latent_start|>``,
``<|latent_pad|>``, ``<|latent_end|>``, but ILVR runs exactly K latents and forces the end (``fixed``), while Mirage
stops when the model chooses the end (``end_token``). A subject is always loaded with a named protocol.

Example::

    >>> from latentprobe.model.protocol import PROTOCOLS
    >>> PROTOCOLS["mirage"].stop_rule, PROTOCOLS["mirage"].num_steps
    ('end_token', 8)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from ..errors import LatentProbeError

StopRule = Literal["fixed", "end_token"]
ExitRule = Literal["force_end", "model_choice"]
LatentLayout = Literal["training", "inference"]
LATENT_LAYOUTS = ("training", "inference")
EXIT_RULES = ("force_end", "model_choice")


def check_layout(layout: str) -> str:
    if layout not in LATENT_LAYOUTS:
        raise LatentProbeError(f"unknown latent layout {layout!r}",
                               f"use one of {', '.join(LATENT_LAYOUTS)} (see latentprobe.model.protocol)")
    return layout

# Key masks for the organisms whose causal structure is built in (see latentprobe.organisms):
#   "answer_blind_to_image":  after latent mode ends, queries cannot attend to image tokens (bottleneck)
#   "answer_blind_to_latents": after latent mode ends, queries cannot attend to latent positions (shortcut)
#   "latents_blind_to_image":  while in latent mode (the start token and the latent positions), queries cannot attend
#                              the image or the prompt after it; the answer can (blind)
#   "answer_blind_to_prompt":  after latent mode ends, queries cannot attend any prompt position (text-routed)
#   "latents_blind_to_prompt": while in latent mode, queries cannot attend any prompt position (text-bypass)
# Several join with "+" ("latents_blind_to_prompt+answer_blind_to_latents"), each applied as alone.
AnswerMask = Literal["answer_blind_to_image", "answer_blind_to_latents", "latents_blind_to_image",
                     "answer_blind_to_prompt", "latents_blind_to_prompt"]


@dataclass(frozen=True)
class LatentProtocol:
    """How one model family enters, runs and leaves latent mode."""

    name: str
    start_token: str
    end_token: str
    pad_token: str | None
    stop_rule: StopRule
    num_steps: int
    write_pad_ids: bool = True  # False: keep the model's own sampled ids at latent steps (Monet)
    head_module: str | None = None  # attribute path of a feedback head in the checkpoint (LVR), if present
    extra_tokens: tuple[str, ...] = ()
    answer_mask: AnswerMask | None = None
    exit_rule: ExitRule = "force_end"
    latent_layout: LatentLayout = "training"
    head_maps_first: bool = False  # the head maps z_0 too (CODI); LVR feeds z_0 as it is
    never_in_text: tuple[str, ...] = ()  # tokens never chosen outside latent mode (ILVR's template, CODI's eot)
    source: str = ""

    def __post_init__(self):
        if self.stop_rule not in ("fixed", "end_token"):
            raise LatentProbeError(f"protocol {self.name}: unknown stop rule {self.stop_rule!r}",
                                   "use 'fixed' or 'end_token'")
        if self.exit_rule not in EXIT_RULES:
            raise LatentProbeError(f"protocol {self.name}: unknown exit rule {self.exit_rule!r}",
                                   f"use one of {', '.join(EXIT_RULES)}")
        check_layout(self.latent_layout)
        if self.num_steps < 1:
            raise LatentProbeError(f"protocol {self.name}: num_steps must be >= 1, got {self.num_steps}",
                                   "set the fixed step count or the cap to a positive number")
        if self.pad_token is None and self.write_pad_ids:
            raise LatentProbeError(f"protocol {self.name}: write_pad_ids needs a pad_token", "name the pad token")
        unknown = [tok for tok in self.never_in_text if tok not in self.token_strings]
        if unknown:
            raise LatentProbeError(f"protocol {self.name}: never_in_text names {', '.join(unknown)}, which is not "
                                   "one of its tokens", "list only the protocol's start, end, pad or extra tokens")
        if self.head_maps_first and not self.head_module:
            raise LatentProbeError(f"protocol {self.name}: head_maps_first needs a head_module",
                                   "name the head module, or drop head_maps_first")

    @property
    def needs_logits_in_latent(self) -> bool:
        """The LM head runs at every latent step only if the stop rule or the written ids need its choice (a
        ``model_choice`` exit needs it once, after the last step; the decoder asks for that row alone)."""
        return self.stop_rule == "end_token" or not self.write_pad_ids

    @property
    def token_strings(self) -> tuple[str, ...]:
        tokens = [self.start_token, self.end_token] + ([self.pad_token] if self.pad_token else [])
        return tuple(tokens) + tuple(self.extra_tokens)

    def with_steps(self, num_steps: int) -> "LatentProtocol":
        return replace(self, num_steps=num_steps)

    def with_layout(self, layout: str) -> "LatentProtocol":
        """The same protocol run in another layout (``training`` or ``inference``)."""
        check_layout(layout)
        return replace(self, latent_layout=layout)

    def resolve(self, tokenizer) -> "ResolvedProtocol":
        """Look the token strings up in ``tokenizer``; a missing one is an error naming it."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in self.token_strings if tok not in vocab]
        if missing:
            raise LatentProbeError(
                f"the tokenizer lacks the {self.name} protocol's token(s) {', '.join(missing)}",
                "load the checkpoint this protocol belongs to, or pick the matching --protocol")
        return ResolvedProtocol(
            protocol=self,
            start_id=vocab[self.start_token],
            end_id=vocab[self.end_token],
            pad_id=vocab[self.pad_token] if self.pad_token else None,
            never_in_text_ids=tuple(vocab[tok] for tok in self.never_in_text),
        )

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedProtocol:
    """A protocol with its token ids read from one tokenizer."""

    protocol: LatentProtocol
    start_id: int
    end_id: int
    pad_id: int | None
    never_in_text_ids: tuple[int, ...] = ()

    def __getattr__(self, item):  # protocol fields read through (stop_rule, num_steps, ...)
        return getattr(self.protocol, item)


MONET = LatentProtocol(
    name="monet", pad_token="<abs_vis_token_pad>", start_token="<abs_vis_token>", end_token="</abs_vis_token>",
    extra_tokens=("<observation>", "</observation>"), stop_rule="end_token", num_steps=10, write_pad_ids=False,
    latent_layout="inference",
    source="NOVAglow646/Monet: LATENT_SIZE=10 at inference; sampled ids kept in the output and stripped later; "
           "inference layout from inference/vllm/monet_gpu_model_runner.py (training layout: "
           "monet_qwen_model/modeling_qwen2_5_vl_monet.py)")
LVR = LatentProtocol(
    name="lvr", start_token="<|lvr_start|>", pad_token="<|lvr|>", end_token="<|lvr_end|>",
    extra_tokens=("<|lvr_latent_end|>",), stop_rule="fixed", num_steps=4, write_pad_ids=True, head_module="lvr_head",
    exit_rule="model_choice",
    source="VincentLeebang/lvr: _lvr_deocding_by_steps, K steps (4/8/16 in evaluation) then the model's own "
           "argmax (no forced <|lvr_end|>); optional LVRHead (src/model/lvr_heads.py)")
MIRAGE = LatentProtocol(
    name="mirage", pad_token="<|latent_pad|>", start_token="<|latent_start|>", end_token="<|latent_end|>",
    stop_rule="end_token", num_steps=8, write_pad_ids=True,
    source="UMass-Embodied-AGI/Mirage: model-emitted <|latent_end|>, cap 8 (trained with 4 latent tokens)")

ILVR = LatentProtocol(
    name="ilvr", pad_token="<|latent_pad|>", start_token="<|latent_start|>", end_token="<|latent_end|>",
    stop_rule="fixed", num_steps=8, write_pad_ids=True, exit_rule="force_end",
    never_in_text=("<|latent_pad|>", "<|latent_end|>"),
    source="XD111ds/ILVR: src/utils_deepseed.py LatentTemplateLogitsProcessor (pad and end banned outside a span; "
           "K pads then the end forced), K = config.latent_size = 8 (run_training.sh LATENT_SIZE=8); the model opens "
           "each span itself; transformers/src/transformers/generation/utils.py _sample feeds the last hidden "
           "state at each pad position")
COCONUT = LatentProtocol(
    name="coconut", start_token="<|start-latent|>", pad_token="<|latent|>", end_token="<|end-latent|>",
    stop_rule="fixed", num_steps=6, write_pad_ids=True, exit_rule="force_end",
    source="facebookresearch/coconut: coconut.py (each <|latent|> position takes the last hidden state of the "
           "position before it); dataset.py get_question_latent_dataset (question, start, latent x k, end); "
           "k = max_latent_stage x c_thought = 6 (args/prosqa_coconut_eval.yaml, args/gsm_coconut_eval.yaml)")
CODI = LatentProtocol(
    name="codi", start_token="<|codi_bot|>", pad_token="[PAD]", end_token="<|codi_eot|>",
    stop_rule="fixed", num_steps=6, write_pad_ids=True, exit_rule="force_end", head_module="prj",
    head_maps_first=True, never_in_text=("<|codi_eot|>",),
    source="zhenyi4/codi: src/model.py (bot/eot ids past the vocabulary, prj head), test.py (bot appended, "
           "inf_latent_iterations latents each projected by prj, the first included; eot fed; logits cut before "
           "the last id), scripts/test_gpt2.sh (6 iterations)")

PROTOCOLS: dict[str, LatentProtocol] = {}


def register_protocol(protocol: LatentProtocol) -> LatentProtocol:
    """Add a protocol to the registry, as `latentprobe.model.subjects.register` adds a subject spec: a name can be
    taken once. Returns the protocol, so a module can write ``MINE = register_protocol(LatentProtocol(...))``."""
    if protocol.name in PROTOCOLS and PROTOCOLS[protocol.name] is not protocol:
        raise LatentProbeError(f"a protocol named {protocol.name!r} is already registered",
                               "give the new protocol another name")
    PROTOCOLS[protocol.name] = protocol
    return protocol


for _protocol in (MONET, LVR, MIRAGE, ILVR, COCONUT, CODI):
    register_protocol(_protocol)


def get_protocol(name: str) -> LatentProtocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise LatentProbeError(f"unknown protocol {name!r}", f"choose one of {', '.join(sorted(PROTOCOLS))}") from None
