"""The organisms as data: architecture, protocol, prompt, and what each one's training loss is.

Every organism is a tiny Qwen2.5-VL trained from scratch on the procedural `transform` task (a 2x2 colour grid,
"after flipping / rotating / swapping, what colour is cell X?", four colour options, chance 0.25). The vision
tower stays at its seeded random initialisation (LVR and Mirage freeze theirs too); only the language model
learns. What differs between organisms is how the answer may use the image:

============  ==========  ===============================================================================
organism      mediator    causal structure (by construction, or by recipe)
============  ==========  ===============================================================================
direct        none        answers at once; no latent mode (the baseline)
bottleneck    latent      ONE decoder layer and the answer is blind to image tokens: every bit of image
                          information the answer gets is in the fed-back latent vectors (exact). Latents
                          1-3 regress (MSE) onto the answer cell's image tokens, which gets the chain going
shortcut      latent      the answer is blind to latent positions: the latents carry nothing to it (exact),
                          although they are trained (LVR-style MSE) to hold the answer cell's image tokens
mirage        latent      Mirage's recipe: stage 1 (first half) aligns latent k (cosine) with the k-th
                          pooled cell of the auxiliary (transformed) image plus answer CE; stage 2 answer CE
                          only; the model emits <|latent_end|> itself after 4 latents (cap 8)
lvr           latent      LVR's recipe: latent k regresses (MSE) onto the k-th image token of the region of
                          interest (the source cell of the answer); fixed 4 steps; answer CE. Its raw-token MSE
                          pulls the latents onto the mean image token (the random vision tower's shared offset);
                          ``align="mse_roi_tokens_standardised"`` standardises each target dimension first (a
                          retrain with it is pending: see the README)
blind         latent      the model opens latent mode itself; in latent mode (its start token and the latent
                          positions) no query can attend the image or the prompt after it, so the latents are a
                          function of the question alone (exact); the answer reads the image directly
collapsed     latent      every latent of every instance regresses (MSE, weight 10) onto one seeded vector: the
                          latents collapse by the loss; the answer reads the image directly
capimagine    text        writes ``<imagine>`` + the transformed grid in words + ``</imagine>``, then the
                          letter (the letter's cross-entropy weighted x5 among the written tokens)
============  ==========  ===============================================================================

Why the bottleneck has one layer: with the decoder's ``answer_blind_to_image`` key mask the answer cannot attend
image tokens, but with two or more layers it can still attend the question tokens and the latent positions,
whose upper-layer states did attend the image. With a single layer every key and value the answer sees is a
function of that position's *input* (a text embedding, or a latent vector z_k), so image information can only
arrive through the z_k. The latent chain supplies the depth the task needs (Coconut-style).

Every organism learns the task with a phase transition (accuracy sits at the "most frequent colour" heuristic,
about 0.53, then jumps); the step counts leave room after it for seed 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..model.protocol import LVR, MIRAGE, LatentProtocol
from ..model.subject import PromptStyle

# The organisms use the LVR token strings for their own fixed-K protocols; the names say which organism they are.
BOTTLENECK = LatentProtocol(
    name="bottleneck", start_token=LVR.start_token, end_token=LVR.end_token, pad_token=LVR.pad_token,
    stop_rule="fixed", num_steps=4, write_pad_ids=True, answer_mask="answer_blind_to_image",
    source="latentprobe organism: after latent mode the answer cannot attend image tokens (one layer: exact)")
SHORTCUT = LatentProtocol(
    name="shortcut", start_token=LVR.start_token, end_token=LVR.end_token, pad_token=LVR.pad_token,
    stop_rule="fixed", num_steps=4, write_pad_ids=True, answer_mask="answer_blind_to_latents",
    source="latentprobe organism: after latent mode the answer cannot attend latent positions")
BLIND = LatentProtocol(
    name="blind", start_token=LVR.start_token, end_token=LVR.end_token, pad_token=LVR.pad_token,
    stop_rule="fixed", num_steps=4, write_pad_ids=True, answer_mask="latents_blind_to_image",
    source="latentprobe organism: the model opens latent mode itself; in latent mode (its start token and latent "
           "positions) it cannot attend the image or the prompt after it; the answer can")
COLLAPSED = LatentProtocol(
    name="collapsed", start_token=LVR.start_token, end_token=LVR.end_token, pad_token=LVR.pad_token,
    stop_rule="fixed", num_steps=4, write_pad_ids=True,
    source="latentprobe organism: LVR's tokens and fixed K; its training loss pulls every latent to one point")
# The LVR organism was trained with the end token forced after its K steps (real LVR feeds its own argmax there).
LVR_FORCED_EXIT = replace(LVR, exit_rule="force_end",
                          source="latentprobe organism: LVR's tokens and fixed K, trained with a forced end token")
ORGANISM_PROTOCOLS = {p.name: p for p in (BOTTLENECK, SHORTCUT, BLIND, COLLAPSED, LVR_FORCED_EXIT, MIRAGE)}

IMAGINE_OPEN, IMAGINE_CLOSE = "<imagine>", "</imagine>"

IMAGE_SIZE = 112  # 2x2 grid of 56-px cells: every cell is exactly 2x2 merged image tokens (4 tokens per cell)


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that defines one organism: its subject-facing facts and its training schedule."""

    name: str
    summary: str
    protocol: LatentProtocol | None
    mediator: str | None  # "latent", "text" or None
    ground_truth: str  # what the latents (or text) do for the answer, in one line
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    rope_theta: float = 4.0  # see latentprobe.organisms.architecture: rotary frequencies a 4x4 token grid can resolve
    latent_steps: int = 4  # fed latent vectors during training (the protocol's K, or where the model stops)
    stop_loss: bool = False  # train the LM head to emit the end token after `latent_steps` (end_token rule)
    # "cosine_aux_cells" (Mirage stage 1), "mse_roi_tokens" (LVR as published: raw image tokens),
    # "mse_roi_tokens_standardised" (the same tokens, each dimension centred and scaled over the image tokens) or
    # "mse_fixed_point" (one seeded vector for every latent of every instance: collapse by the loss)
    align: str | None = None
    align_weight: float = 0.0
    align_fraction: float = 1.0  # share of the steps that carry the alignment loss (Mirage: stage 1 only)
    align_steps: tuple[int, ...] | None = None  # latent steps whose vectors are aligned (None: all)
    answer_weight: float = 1.0  # weight of the answer letter among the continuation tokens' cross-entropy
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_new_tokens: int = 8
    text_mediator_markers: tuple[str, str] | None = None
    task: str = "transform"
    task_options: dict[str, Any] = field(default_factory=dict)
    opens_latent: bool = False  # the model chooses its start token (trained: open_ce), not the prompt
    # What the construction (or the loss) fixes, per finding: the verdict the demo must decide for this organism.
    # Findings left out are learned and not asserted; ``truth_why`` says why each entry holds.
    truth: dict[str, str] = field(default_factory=dict)
    truth_why: str = ""

    @property
    def subject_name(self) -> str:
        return f"organism-{self.name}"

    @property
    def prompt_style(self) -> PromptStyle:
        # No system turn: shorter prompts, and nothing in them the organisms never needed. Images after the
        # question: see latentprobe.organisms.architecture for why a two-layer model needs that layout.
        return PromptStyle(system_prompt="", force_latent_start=self.protocol is not None and not self.opens_latent,
                           image_position="after")

    @property
    def is_latent(self) -> bool:
        return self.protocol is not None


ORGANISMS: dict[str, OrganismRecipe] = {r.name: r for r in (
    OrganismRecipe(
        name="bottleneck", protocol=BOTTLENECK, mediator="latent", num_layers=1, hidden_size=96,
        align="mse_roi_tokens", align_weight=1.0, align_steps=(1, 2, 3), steps=3600,
        summary="answer blind to image tokens after latent mode; one layer, so only the latents carry the image",
        ground_truth="everything the answer knows of the image passes through the fed-back latent vectors",
        truth={"input_latent": "connected", "latent_answer": "connected", "collapse": "not collapsed",
               "visual_info": "informative"},
        truth_why="the answer cannot read the image and answers correctly (test accuracy 1.0), so the fed-back "
                  "latents must carry the answer colour: they follow the image, differ across instances, hold "
                  "it readably, and the answer depends on them"),
    OrganismRecipe(
        name="shortcut", protocol=SHORTCUT, mediator="latent", align="mse_roi_tokens", align_weight=1.0, steps=3000,
        summary="answer blind to latent positions; it reads the image directly, while its latents are trained "
                "(LVR-style MSE) to hold the answer cell's image tokens",
        ground_truth="the latents carry nothing to the answer (yet they do hold the answer cell's features)",
        truth={"latent_answer": "disconnect"},
        truth_why="the answer cannot attend latent positions: no latent edit can reach it"),
    OrganismRecipe(
        name="blind", protocol=BLIND, mediator="latent", opens_latent=True, steps=2400,
        summary="latent positions blind to the image (and the prompt after it); the answer reads the image "
                "directly; the model opens latent mode itself",
        ground_truth="the latents are a function of the question alone: no image edit can move them and they hold "
                     "no image attribute",
        truth={"input_latent": "disconnect", "visual_info": "limited"},
        truth_why="in latent mode every query is masked from the image and from the prompt positions after it, and "
                  "the question comes before the image, so every latent state is computed without the image"),
    OrganismRecipe(
        name="collapsed", protocol=COLLAPSED, mediator="latent", align="mse_fixed_point", align_weight=10.0,
        steps=2400,
        summary="every latent of every instance is pulled (MSE, weight 10) to one seeded vector; the answer reads "
                "the image directly",
        ground_truth="the latents sit at one point whatever the input (collapse by the training loss)",
        truth={"collapse": "collapsed"},
        truth_why="the training loss is minimised only when every latent equals one fixed vector"),
    OrganismRecipe(
        name="direct", protocol=None, mediator=None,
        summary="answers at once with no latent mode (baseline)",
        ground_truth="no mediator"),
    OrganismRecipe(
        name="mirage", protocol=MIRAGE, mediator="latent", stop_loss=True, align="cosine_aux_cells",
        align_weight=1.0, align_fraction=0.5, steps=3200,
        max_new_tokens=12,  # room for the cap of 8 latents, the end token, the letter and <|im_end|>
        summary="Mirage recipe: latents aligned (cosine) to pooled aux-image cells, then answer CE only; "
                "emits <|latent_end|> after 4 latents",
        ground_truth="learned: free to use the latents or the image"),
    OrganismRecipe(
        name="lvr", protocol=LVR_FORCED_EXIT, mediator="latent", align="mse_roi_tokens", align_weight=1.0,
        summary="LVR recipe: latents regress (MSE) onto the answer cell's image tokens; fixed 4 steps",
        ground_truth="learned: free to use the latents or the image"),
    OrganismRecipe(
        name="capimagine", protocol=None, mediator="text", max_new_tokens=40, answer_weight=5.0, steps=3000,
        text_mediator_markers=(IMAGINE_OPEN, IMAGINE_CLOSE),
        summary="writes the transformed grid in words between <imagine> markers, then answers",
        ground_truth="learned: free to use the imagination text or the image"),
)}


def get_recipe(name: str) -> OrganismRecipe:
    from ..errors import LatentProbeError

    key = name.removeprefix("organism-")
    if key not in ORGANISMS:
        raise LatentProbeError(f"unknown organism {name!r}", f"choose one of {', '.join(ORGANISMS)}")
    return ORGANISMS[key]


def organism_recipe(subject_name: str) -> OrganismRecipe | None:
    """The `OrganismRecipe` of an ``organism-NAME`` subject, or None for any other subject."""
    if not str(subject_name).startswith("organism-"):
        return None
    return ORGANISMS.get(str(subject_name).removeprefix("organism-"))
