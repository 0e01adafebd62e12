"""Text organisms: build, train, save and load the tiny GPT-2 latent-CoT models of `text_recipes`.

    >>> from latentprobe.model.subjects import load_subject
    >>> subject = load_subject("organism-text-routed")
    >>> subject.protocol.answer_mask, subject.text_only
    ('answer_blind_to_prompt', True)
    >>> from latentprobe.organisms.text import train_text_organism
    >>> result = train_text_organism("text-routed", out_dir="my_weights", seed=1)   # doctest: +SKIP

Training runs the decoder's own loop unrolled with gradients (`latentprobe.organisms.unroll`, the same code the
image organisms train with), with the decoder's key masks, so an organism is decoded exactly as it was trained.
The tokenizer is a word-level one over the task's words (every name, arrow and word one token), built from the
task, so every question of a setting has the same length and the same tokens at the same positions.

Determinism: the data come from ``data_seed``, the initialisation and batch order from ``seed``; the same call
gives bit-identical weights with the same torch version and thread count (both recorded in the metrics).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..data.instances import Instance
from ..data.tasks.hops import SYMBOLS, hops_instances
from ..errors import LatentProbeError
from ..fileio import atomic_write, atomic_write_json
from ..model.decoding import LatentDecoder
from ..model.subject import Subject
from .text_recipes import ANSWER_MARK, TEXT_ORGANISMS, TextOrganismRecipe
from .unroll import EncodedRows, unroll

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
EOS, UNK = "<|endoftext|>", "<|unk|>"
# Every word a hops question is written with, besides the names (their order fixes the token ids).
TASK_WORDS = (">", ".", ",", "?", "###", "start", "at", "follow", "arrows", "1", "2", "3", "4", "5", "6", "7", "8",
              "9")
N_TEST = 600  # the held-out split the metrics are measured on (the demo and commands take its first 80)


def get_text_recipe(name: str) -> TextOrganismRecipe:
    key = str(name).removeprefix("organism-")
    if key not in TEXT_ORGANISMS:
        raise LatentProbeError(f"unknown text organism {name!r}", f"choose one of {', '.join(TEXT_ORGANISMS)}")
    return TEXT_ORGANISMS[key]


# ------------------------------------------------------------------------------------------------- building
def build_tokenizer(protocol_tokens: tuple[str, ...]):
    """A word-level tokenizer over the hops task's words: punctuation splits from names ("ant>gnu" is three
    tokens), ``<|endoftext|>`` is eos and bos (as GPT-2's), ``<|unk|>`` any other word; the protocol's tokens are
    added as special tokens after the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (EOS, UNK) + tuple(SYMBOLS) + TASK_WORDS
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=UNK,
                                        padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(protocol_tokens)})
    return tokenizer


def build_model(recipe: TextOrganismRecipe, tokenizer, seed: int = 0):
    """A seeded random causal LM of the recipe's shape (float32, eager attention, no dropout, untied head)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    if recipe.backbone != "gpt2":
        raise LatentProbeError(f"text organism {recipe.name}: backbone {recipe.backbone!r} is not built here",
                               "text organisms use gpt2")
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=recipe.hidden_size, n_layer=recipe.num_layers,
                        n_head=recipe.num_heads, n_positions=recipe.n_positions, bos_token_id=eos_id,
                        eos_token_id=eos_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def build_subject(recipe: TextOrganismRecipe, model, tokenizer, checkpoint: str = "") -> Subject:
    """The Subject a text organism is studied as (the same object whether freshly trained or loaded)."""
    subject = Subject(
        name=recipe.subject_name, model=model, tokenizer=tokenizer, image_processor=None, protocol=recipe.protocol,
        prompt_style=recipe.prompt_style, answer_parser=recipe.answer_parser, mediator=recipe.mediator,
        checkpoint=checkpoint, max_new_tokens=recipe.max_new_tokens, answer_prefix=recipe.answer_prefix,
        answer_lead=" " if recipe.answer_prefix else "",
        description=f"text organism {recipe.name}: {recipe.summary}. Ground truth: {recipe.ground_truth}")
    subject.input_conditions = {"task": recipe.task,
                                "why": f"trained on {recipe.hops}-hop lookups among {recipe.n_symbols} names"}
    return subject


def fresh_subject(recipe: TextOrganismRecipe, seed: int = 0) -> Subject:
    tokenizer = build_tokenizer(recipe.protocol.token_strings)
    return build_subject(recipe, build_model(recipe, tokenizer, seed=seed), tokenizer, checkpoint="untrained")


# ------------------------------------------------------------------------------------------------- data
def text_organism_data(recipe: TextOrganismRecipe, split: str = "test", n: int | None = None,
                       data_seed: int = 0) -> list[Instance]:
    """The organism's own questions: the first ``n`` of its held-out split (default all 600) or of its training
    split (default ``n_train``). The splits are disjoint by construction (`latentprobe.data.tasks.hops`)."""
    if n is None:
        n = N_TEST if split == "test" else recipe.n_train
    if split == "test" and not 1 <= n <= N_TEST:
        raise LatentProbeError(f"the held-out split has {N_TEST} instances; {n} were asked for",
                               f"ask for 1 to {N_TEST}")
    return hops_instances(n, seed=data_seed, split=split, n_symbols=recipe.n_symbols, hops=recipe.hops)


@dataclass
class TextRows(EncodedRows):
    """Encoded text rows with the ids of each question's chain of names (start, first hop, ..., the answer)."""

    chain_ids: torch.Tensor | None = None  # (B, hops + 1)

    def select(self, index: torch.Tensor) -> "TextRows":
        rows = super().select(index)
        return TextRows(**{f.name: getattr(rows, f.name) for f in fields(EncodedRows)},
                        chain_ids=None if self.chain_ids is None else self.chain_ids[index])


@torch.no_grad()
def encode_rows(subject: Subject, recipe: TextOrganismRecipe, instances: list[Instance]) -> TextRows:
    """Prompts, positions and continuations of text instances, ready to unroll: the answer name then eos, or
    (``writes_chain``) the chain's names, ``###``, the answer name and eos."""
    decoder = LatentDecoder(subject)
    tokenizer = subject.tokenizer
    batch = subject.encode(instances)
    n, length = batch.input_ids.shape
    vocab = tokenizer.get_vocab()
    unknown = sorted({name for inst in instances for name in inst.attributes["chain"] if name not in vocab})
    if unknown:
        raise LatentProbeError(f"the names {', '.join(unknown)} are not tokens of this tokenizer",
                               "text organisms answer one name of the hops task")
    chain_ids = torch.tensor([[vocab[name] for name in inst.attributes["chain"]] for inst in instances])
    gold_ids = chain_ids[:, -1]
    eos = torch.full((n, 1), tokenizer.convert_tokens_to_ids(EOS))
    answer = gold_ids.unsqueeze(1)
    if recipe.writes_chain:
        mark = torch.full((n, 1), vocab[ANSWER_MARK])
        continuation = torch.cat([chain_ids, mark, answer, eos], dim=1)
    else:
        continuation = torch.cat([answer, eos], dim=1)
    slot = continuation.shape[1] - 2  # the answer, then eos
    return TextRows(instance_ids=[inst.id for inst in instances], input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask, image_mask=torch.zeros((n, length), dtype=torch.bool),
                       position_ids=decoder.prefill_positions(batch), image_embeds=torch.zeros((n, 0, subject.hidden_size)),
                       continuation=continuation, continuation_mask=torch.ones(continuation.shape, dtype=torch.bool),
                       gold_ids=gold_ids, answer_slot=torch.full((n,), slot, dtype=torch.long), chain_ids=chain_ids)


def text_unroll(subject: Subject, recipe: TextOrganismRecipe, rows: EncodedRows, decoder: LatentDecoder | None = None):
    """The decoder's loop unrolled with gradients (`latentprobe.organisms.unroll`): prefill, (the model's own start
    token), K latent steps, then the end token and the continuation teacher-forced."""
    proto = subject.resolved_protocol
    return unroll(decoder or LatentDecoder(subject), rows, n_latent=recipe.latent_steps,
                  answer_mask=proto.answer_mask, end_id=proto.end_id,
                  start_id=proto.start_id if recipe.opens_latent else None)


def losses(subject: Subject, recipe: TextOrganismRecipe, rows: TextRows, out) -> dict[str, torch.Tensor]:
    """Cross-entropy of the continuation after the end token (the answer and eos, or the written chain, ``###``,
    the answer and eos); for a model that opens latent mode itself, of its start token after the prompt; with
    ``chain_weight``, of the chain's k-th name read out (through the LM head) from the state fed back as z_k."""
    import torch.nn.functional as F

    terms = {"answer_ce": F.cross_entropy(out.logits.transpose(1, 2), rows.continuation)}
    if recipe.chain_weight and out.decision_hidden is not None:
        links = min(rows.chain_ids.shape[1], out.decision_hidden.shape[1])
        logits = subject.model.lm_head(out.decision_hidden[:, :links]).float()
        terms["chain_ce"] = recipe.chain_weight * F.cross_entropy(logits.transpose(1, 2), rows.chain_ids[:, :links])
    if out.open_logits is not None:
        target = torch.full((len(rows),), subject.resolved_protocol.start_id, dtype=torch.long)
        terms["open_ce"] = F.cross_entropy(out.open_logits, target)
    return terms


@torch.no_grad()
def own_eval(subject: Subject, recipe: TextOrganismRecipe, rows: EncodedRows, batch_size: int = 200) -> float:
    """The training code's accuracy: the argmax at the answer slot of the unrolled decode."""
    decoder = LatentDecoder(subject)
    hits = 0
    for start in range(0, len(rows), batch_size):
        part = rows.select(torch.arange(start, min(start + batch_size, len(rows))))
        predicted = text_unroll(subject, recipe, part, decoder).answer_logits(part.answer_slot).argmax(-1)
        hits += int((predicted == part.gold_ids).sum())
    return hits / len(rows)


# ------------------------------------------------------------------------------------------------- training
def train_text_organism(name: str, out_dir: str | Path | None = None, seed: int = 0, *, data_seed: int = 0,
                        steps: int | None = None, batch_size: int | None = None, learning_rate: float | None = None,
                        n_train: int | None = None, eval_every: int = 0, threads: int | None = 1, log=None,
                        **recipe_overrides: Any):
    """Train text organism ``name`` (``text-routed``, ``text-bypass``) and, with ``out_dir``, save it there as
    ``<name>.safetensors`` + ``<name>.json`` (and its metrics in ``metrics.json``). Returns a
    `latentprobe.organisms.TrainResult` (subject, recipe, folder, metrics, history).

    ``test_accuracy`` in the metrics is measured by `LatentDecoder` on the 600 held-out questions;
    ``own_eval_accuracy`` by the unrolled training computation on the same questions (they agree). ``threads``
    sets torch's intra-op threads for the call (one: fastest at this size, and reproducible)."""
    import dataclasses

    from .training import TrainResult, _learning_rate, optimisation_step

    recipe = dataclasses.replace(get_text_recipe(name), **recipe_overrides)
    steps = recipe.steps if steps is None else steps
    batch_size = batch_size or recipe.batch_size
    learning_rate = learning_rate or recipe.learning_rate
    n_train = n_train or recipe.n_train
    say = log or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        began = time.perf_counter()
        train_instances = text_organism_data(recipe, "train", n_train, data_seed)
        test_instances = text_organism_data(recipe, "test", N_TEST, data_seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            subject = fresh_subject(recipe, seed=seed)
            model = subject.model
            train_rows = encode_rows(subject, recipe, train_instances)
            test_rows = encode_rows(subject, recipe, test_instances)
            params = [p for p in model.parameters() if p.requires_grad]
            optimiser = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
            order_gen = torch.Generator().manual_seed(seed)
            order, cursor = torch.randperm(len(train_rows), generator=order_gen), 0
            decoder = LatentDecoder(subject)
            history: list[dict[str, float]] = []
            model.train()
            for step in range(steps):
                if cursor + batch_size > len(order):
                    order, cursor = torch.randperm(len(train_rows), generator=order_gen), 0
                rows = train_rows.select(order[cursor:cursor + batch_size])
                cursor += batch_size
                for group in optimiser.param_groups:
                    group["lr"] = _learning_rate(step, steps, learning_rate, warmup=100)  # text: a longer warmup
                terms = losses(subject, recipe, rows, text_unroll(subject, recipe, rows, decoder))
                loss = optimisation_step(optimiser, params, terms, step, steps, history)
                if eval_every and (step + 1) % eval_every == 0:
                    model.eval()
                    accuracy = own_eval(subject, recipe, test_rows)
                    model.train()
                    history[-1]["test_accuracy_own"] = accuracy
                    say(f"{name}: step {step + 1} loss {float(loss.detach()):.3f} own test acc {accuracy:.3f} "
                        f"({time.perf_counter() - began:.0f}s)")
            model.eval()
        train_seconds = time.perf_counter() - began
        metrics: dict[str, Any] = {
            "organism": recipe.name, "subject": recipe.subject_name, "task": recipe.task, "hops": recipe.hops,
            "n_symbols": recipe.n_symbols, "seed": seed, "data_seed": data_seed, "n_train": len(train_rows),
            "n_test": len(test_rows), "chance": 1.0 / recipe.n_symbols, "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "train_seconds": round(train_seconds, 1),
            "own_eval_accuracy": own_eval(subject, recipe, test_rows),
            "train_accuracy_own": own_eval(subject, recipe, train_rows.select(torch.arange(min(600, len(train_rows))))),
            "final_loss": history[-1]["loss"] if history else None,
            "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "protocol"}
            | {"protocol": recipe.protocol.name},
        }
        from .evaluation import decoder_accuracy

        metrics.update(decoder_accuracy(subject, test_instances, batch_size=200))
        metrics["call_seconds"] = round(time.perf_counter() - began, 1)
        metrics["torch_version"], metrics["torch_threads"] = torch.__version__, torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    folder = None
    if out_dir is not None:
        from .shipping import update_metrics

        folder = save_text_organism(subject, recipe, out_dir, training=metrics | {"history": history})
        metrics["weights_bytes"] = (Path(folder) / f"{recipe.name}.safetensors").stat().st_size
        update_metrics(folder, recipe.name, training=metrics)
    say(f"{name}: done in {train_seconds:.0f}s: own_eval_accuracy={metrics['own_eval_accuracy']}, "
        f"test_accuracy={metrics['test_accuracy']}")
    return TrainResult(subject=subject, recipe=recipe, folder=folder, metrics=metrics, history=history)


# ------------------------------------------------------------------------------------------------- shipping
def shipped_text_organisms(folder: str | Path | None = None) -> list[str]:
    """Names of the text organisms whose weights and JSON are present in ``folder`` (default: the package's)."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    return [name for name in TEXT_ORGANISMS
            if (folder / f"{name}.safetensors").exists() and (folder / f"{name}.json").exists()]


def save_text_organism(subject: Subject, recipe: TextOrganismRecipe, folder: str | Path,
                       training: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` (weights) and ``<name>.json`` (config, tokenizer, training record)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in subject.model.state_dict().items()}
    atomic_write(folder / f"{recipe.name}.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"organism": recipe.name,
                                                                    "format": str(FORMAT_VERSION)}))
    tokenizer = subject.tokenizer
    record = {
        "format": FORMAT_VERSION, "organism": recipe.name, "subject": recipe.subject_name, "kind": "text",
        "summary": recipe.summary, "ground_truth": recipe.ground_truth, "protocol": recipe.protocol.describe(),
        "config": subject.model.config.to_dict(),
        "tokenizer": {"backend": json.loads(tokenizer.backend_tokenizer.to_str()), "eos_token": tokenizer.eos_token,
                      "unk_token": tokenizer.unk_token,
                      "special_tokens": list(recipe.protocol.token_strings)},
        "training": training or {},
    }
    atomic_write_json(folder / f"{recipe.name}.json", record)
    return folder


def load_text_organism(name: str, folder: str | Path | None = None, **_: Any) -> Subject:
    """Rebuild a saved text organism offline as a `Subject` (weights read with safetensors only)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    recipe = get_text_recipe(name)
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    path = folder / f"{recipe.name}.json"
    if not path.exists():
        raise LatentProbeError(f"no saved text organism {recipe.name!r} in {folder}",
                               f"train it with latentprobe.organisms.text.train_text_organism({recipe.name!r}, "
                               "out_dir=...)")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT_VERSION:
        raise LatentProbeError(f"{path} has format {record.get('format')}, this latentprobe reads format "
                               f"{FORMAT_VERSION}", "retrain or upgrade latentprobe")
    tok = record["tokenizer"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tok["backend"])),
                                        bos_token=tok["eos_token"], eos_token=tok["eos_token"],
                                        unk_token=tok["unk_token"], padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(tok["special_tokens"])})
    config = GPT2Config.from_dict(record["config"])
    config._attn_implementation = "eager"
    with torch.random.fork_rng():  # the random init is overwritten; do not disturb the caller's generator
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(load_file(str(folder / f"{recipe.name}.safetensors")), strict=False)
    if missing or unexpected:
        raise LatentProbeError(f"text organism {recipe.name}: weights do not match the config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                               "the .safetensors and .json files are from different trainings; retrain")
    return build_subject(recipe, model.eval(), tokenizer, checkpoint=str((folder / recipe.name).resolve()))
