"""LVR's optional head loaded from safetensors with the authors' key names, checked against the authors' module
definitions (VincentLeebang/lvr src/model/lvr_heads.py, restated here as the oracle), and applied the way LVR's
inference applies it: never to the first fed vector."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentprobe.data import builtin_instances
from latentprobe.model.decoding import LATENT, DecodeConfig, LatentDecoder, replay
from latentprobe.errors import LatentProbeError
from latentprobe.model.subjects import load_subject
from latentprobe.model.subjects.lvr_head import build_head
from latentprobe.model.subjects.tiny import save_checkpoint

DIM = 64  # the stand-in's hidden size


class AuthorsLVRHead(torch.nn.Module):  # src/model/lvr_heads.py, LVRHead
    def __init__(self, hidden_size):
        super().__init__()
        self.ln_q = torch.nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.GELU(),
                                       torch.nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x))


class AuthorsLVRHeadGLU(torch.nn.Module):  # src/model/lvr_heads.py, LVRHeadGLU (hidden_act silu)
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("lvr-standin") / "ckpt")


def _with_head(standin, folder, head):
    folder.mkdir()
    for item in standin.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():  # weights far from init, so a wrong layout or eps would show
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    weights.update({f"lvr_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("variant", ["simple", "glu"])
def test_head_loads_with_the_authors_keys_and_computes_their_function(standin, tmp_path, variant):
    torch.manual_seed(0)
    reference = AuthorsLVRHead(DIM) if variant == "simple" else AuthorsLVRHeadGLU(DIM, 96)
    keys = set(reference.state_dict())
    assert keys == ({"ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
                    if variant == "simple" else
                    {f"{n}.{p}" for n in ("gate_proj", "up_proj", "down_proj") for p in ("weight", "bias")})
    folder = _with_head(standin, tmp_path / variant, reference)
    subject = load_subject("lvr", checkpoint=str(folder))
    head = subject.model.lvr_head
    assert head.variant == variant
    if variant == "simple":
        assert head.ln_q.eps == 1e-6
    x = torch.randn(5, DIM) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(head(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_first_fed_vector_skips_the_head(standin, tmp_path):
    folder = _with_head(standin, tmp_path / "glu", AuthorsLVRHeadGLU(DIM, 96))
    subject = load_subject("lvr", checkpoint=str(folder))
    subject.prompt_style = replace(subject.prompt_style, force_latent_start=True)  # (a copy: the spec's is shared)
    batch = subject.encode(builtin_instances(2))
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=6)).run(batch)
    hidden = replay(subject, batch, result)
    for r, row in enumerate(result.rows):
        positions = [result.prompt_length + j for j, k in enumerate(row.step_kinds) if k == LATENT]
        before = hidden[r, [p - 1 for p in positions]]
        assert len(positions) == 4
        with torch.no_grad():
            torch.testing.assert_close(row.latent_vectors[0], before[0], atol=1e-4, rtol=1e-4)  # z_0 = h(start)
            torch.testing.assert_close(row.latent_vectors[1:], subject.model.lvr_head(before[1:]),
                                       atol=1e-4, rtol=1e-4)


def test_unknown_head_keys_are_refused():
    tensors = {"0.weight": torch.ones(4), "0.bias": torch.zeros(4)}  # an nn.Sequential head is not LVR's
    with pytest.raises(LatentProbeError, match="neither LVR's LVRHead"):
        build_head(tensors)
