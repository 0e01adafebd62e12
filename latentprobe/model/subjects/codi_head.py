"""CODI's projection head on the fed-back state, as its authors define it (zhenyi4/codi, src/model.py).

``prj = Sequential(Dropout(p), Linear(d, prj_dim), GELU(), Linear(prj_dim, d))`` plus ``ln = LayerNorm(d)`` unless
``prj_no_ln``; the keys of its weights are ``prj.1.*``, ``prj.3.*`` and ``prj.ln.*``. Unlike LVR's head it maps every
fed vector, the first one included: test.py projects the bos-of-thought token's last hidden state before feeding
it, and each latent step's output before feeding the next (``inf_latent_iterations`` = 6 in scripts/test_gpt2.sh).
Dropout is the identity at inference (``prj_dropout`` 0.0 in the test scripts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import LatentProbeError
from .lvr_head import read_head_tensors

LINEAR_KEYS = {"1.weight", "1.bias", "3.weight", "3.bias"}
LN_KEYS = {"ln.weight", "ln.bias"}


def build_codi_head(hidden_size: int, prj_dim: int, layer_norm: bool = True) -> nn.Sequential:
    """CODI's ``prj`` module with fresh weights (the layout its checkpoints' keys name)."""
    head = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden_size, prj_dim), nn.GELU(), nn.Linear(prj_dim, hidden_size))
    if layer_norm:
        head.add_module("ln", nn.LayerNorm(hidden_size))
    return head


def codi_head_from_tensors(tensors: dict[str, torch.Tensor]) -> nn.Sequential:
    """The ``prj`` module for a checkpoint's ``prj.*`` tensors; another key set is an error naming the keys."""
    keys = set(tensors)
    if keys not in (LINEAR_KEYS, LINEAR_KEYS | LN_KEYS):
        raise LatentProbeError(f"the prj weights have keys {sorted(keys)}, not CODI's projection "
                               f"({sorted(LINEAR_KEYS)} plus optional {sorted(LN_KEYS)})",
                               "check the checkpoint against zhenyi4/codi src/model.py (use_prj, prj_no_ln)")
    prj_dim, hidden = tensors["1.weight"].shape
    head = build_codi_head(hidden, prj_dim, layer_norm="ln.weight" in keys)
    head.load_state_dict(tensors)
    return head


def attach_codi_head(subject, folder: Path) -> bool:
    """Load ``prj.*`` from the folder's safetensors onto ``subject.model.prj`` in the model's device and dtype."""
    tensors = read_head_tensors(Path(folder), subject.protocol.head_module)
    if not tensors:
        return False
    head = codi_head_from_tensors(tensors)
    param = next(subject.model.parameters())
    head.to(device=param.device, dtype=param.dtype).eval()
    subject.model.add_module(subject.protocol.head_module, head)
    return True
