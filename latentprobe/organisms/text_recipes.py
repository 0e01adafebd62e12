"""The text organisms as data: tiny GPT-2 latent chain-of-thought models on the ``hops`` task whose causal
structure is built in.

Both answer k-hop lookups in a written permutation (`latentprobe.data.tasks.hops`: "ant>gnu bee>eel ... . start
at cat , follow 2 arrows ?", the answer one of 8 names, chance 0.125) with a Coconut-style protocol: the start
token, K = 3 latent steps each fed the final-norm last hidden state of the position before it, the end token,
then the answer. Both are one-layer GPT-2s of the same size: one layer does one attention read per position, so
following two arrows takes a chain of positions, and the two differ in where that chain may run (the attention
masks the decoder applies, and training unrolls exactly):

=============  ==========================================================================================
organism       causal structure (by construction)
=============  ==========================================================================================
text-routed    after latent mode no query can attend any prompt position; with one layer every key and value
               the answer sees is a function of that position's input (the start and end embeddings, or a
               fed-back latent z_k), so everything the answer knows of the question passes through the fed-back
               latents (exact). The chain runs in the latents: z_0 names the start, z_1 its target, z_2 the next
text-bypass    the model opens latent mode itself; in latent mode (its start token and the latent positions) no
               query can attend any prompt position, so every latent is one constant vector whatever the question
               (exact); after latent mode no query can attend a latent position (exact). The chain runs in words
               after the latents, read from the question (Coconut's language-CoT baseline): "cat fox ant ### ant"
=============  ==========================================================================================

Training: the answer's cross-entropy; the routed organism's fed-back states are also read out through the LM head
as the chain's names (z_k names the k-th, the chain of thought Coconut's curriculum starts from), the bypass
organism is taught its written chain and to open latent mode. Neither loss can change what the masks fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..model.protocol import COCONUT, LatentProtocol
from ..model.subject import PromptStyle

TEXT_ROUTED = replace(
    COCONUT, name="text-routed", num_steps=3, answer_mask="answer_blind_to_prompt",
    source="latentprobe text organism: Coconut's tokens and feedback, 3 fixed latent steps; after latent mode the "
           "answer cannot attend the prompt (one layer: exact)")
TEXT_BYPASS = replace(
    COCONUT, name="text-bypass", num_steps=3, answer_mask="latents_blind_to_prompt+answer_blind_to_latents",
    source="latentprobe text organism: Coconut's tokens and feedback, 3 fixed latent steps; the model opens latent "
           "mode itself; latent mode cannot attend the prompt and the answer cannot attend latent positions")
TEXT_PROTOCOLS = {p.name: p for p in (TEXT_ROUTED, TEXT_BYPASS)}
ANSWER_MARK = "###"  # Coconut's: the answer follows the last "#"


@dataclass(frozen=True)
class TextOrganismRecipe:
    """Everything that defines one text organism: its subject-facing facts and its training schedule."""

    name: str
    summary: str
    protocol: LatentProtocol
    ground_truth: str
    backbone: str = "gpt2"
    num_layers: int = 1
    hidden_size: int = 64
    num_heads: int = 4
    n_positions: int = 320  # learned absolute positions: prompts are 33-34 tokens; room for --max-new-tokens 256
    opens_latent: bool = False  # the model chooses its start token (trained: open_ce), not the prompt
    task: str = "hops"
    n_symbols: int = 8
    hops: int = 2
    n_train: int = 6000
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    # weight of the chain read-out loss: z_k, through the LM head, names the chain's k-th name (start, hop 1, ...)
    chain_weight: float = 0.0
    # the answer region writes the chain in words, then "###" and the answer (Coconut's answer format)
    writes_chain: bool = False
    truth: dict[str, str] = field(default_factory=dict)
    truth_why: str = ""

    @property
    def subject_name(self) -> str:
        return f"organism-{self.name}"

    @property
    def latent_steps(self) -> int:
        return self.protocol.num_steps

    @property
    def max_new_tokens(self) -> int:
        # (start), K latents, end, (the chain's hops + 1 names and ###), the answer name, eos
        return self.latent_steps + 4 + (self.hops + 2 if self.writes_chain else 0)

    @property
    def answer_parser(self) -> str:
        return "after_hash" if self.writes_chain else "exact"

    @property
    def answer_prefix(self) -> str | None:
        """What the answer slot follows: ``###`` after a written chain, else the latent end token (None)."""
        return ANSWER_MARK if self.writes_chain else None

    @property
    def mediator(self) -> str:
        return "latent"

    @property
    def prompt_style(self) -> PromptStyle:
        # the question alone, as text latent-CoT evaluations feed it; the options are not written (every name is one)
        return PromptStyle(plain=True, force_latent_start=not self.opens_latent, option_format="", options_header="")


TEXT_ORGANISMS: dict[str, TextOrganismRecipe] = {r.name: r for r in (
    TextOrganismRecipe(
        name="text-routed", protocol=TEXT_ROUTED, num_layers=1, hidden_size=64, chain_weight=1.0,
        summary="answer blind to the prompt after latent mode; one layer, so only the fed-back latents carry the "
                "question to the answer (2-hop lookups, 3 latent steps)",
        ground_truth="everything the answer knows of the question passes through the fed-back latent vectors",
        truth={"input_latent": "connected", "latent_answer": "connected"},
        truth_why="the answer cannot read the question and is right far above chance, so the fed-back latents must "
                  "carry the answer: they follow the question and the answer depends on them"),
    TextOrganismRecipe(
        name="text-bypass", protocol=TEXT_BYPASS, num_layers=1, hidden_size=64, opens_latent=True,
        writes_chain=True,
        summary="latent mode blind to the prompt, answer blind to latent positions; it writes the chain in words "
                "after its latents, read from the question (2-hop lookups); it opens latent mode itself",
        ground_truth="the latents are one constant vector whatever the question, and no latent edit can reach the "
                     "answer",
        truth={"input_latent": "disconnect", "latent_answer": "disconnect"},
        truth_why="in latent mode every query is masked from the whole prompt, so every latent is computed from the "
                  "start token alone; after latent mode every query is masked from the latent positions"),
)}


def text_recipe(name: str) -> TextOrganismRecipe | None:
    """The recipe of ``text-NAME`` or ``organism-text-NAME`` (None for any other name)."""
    return TEXT_ORGANISMS.get(str(name).removeprefix("organism-"))
