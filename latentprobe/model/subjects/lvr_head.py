"""LVR's optional feedback head, as its authors define it (VincentLeebang/lvr, src/model/lvr_heads.py).

Two variants, told apart by the checkpoint's key names under ``lvr_head.``:

* ``simple`` (``LVRHead``): ``ln_q`` (LayerNorm, eps 1e-6) then ``mlp`` = Linear, GELU, Linear, so the keys are
  ``ln_q.*``, ``mlp.0.*``, ``mlp.2.*``.
* ``glu`` (``LVRHeadGLU``): ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the text model's ``hidden_act``
  (SiLU for Qwen2.5-VL), keys ``gate_proj.*``, ``up_proj.*``, ``down_proj.*``.

At inference LVR applies the head to the outputs of positions run in LVR mode only
(src/train/monkey_patch_forward_lvr.py): the first fed vector, the state of the start token, is fed as it is.
The decoder follows that (`LatentDecoder._through_head`). The 7B stage-1 checkpoint has no head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import LatentProbeError

SIMPLE_KEYS = {"ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
GLU_KEYS = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
LAYER_NORM_EPS = 1e-6


class LVRHead(nn.Module):
    """``mlp(ln_q(x))``: LayerNorm (eps 1e-6), Linear, GELU, Linear."""

    def __init__(self, hidden_size: int, inner_size: int | None = None):
        super().__init__()
        inner_size = inner_size or hidden_size
        self.ln_q = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x))


class LVRHeadGLU(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = True):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def read_head_tensors(folder: Path, module: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``module.`` (or ``model.module.``) in the folder's safetensors, keyed without the prefix."""
    from safetensors import safe_open

    prefix = module + "."
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix) or key.startswith("model." + prefix):
                    tensors[key.split(prefix, 1)[1]] = handle.get_tensor(key)
    return tensors


def build_head(tensors: dict[str, torch.Tensor], hidden_act: str = "silu") -> tuple[nn.Module, str]:
    """The head module for these tensors and its variant name; an unknown key set is an error naming the keys."""
    keys = set(tensors)
    if keys == SIMPLE_KEYS:
        inner, dim = tensors["mlp.0.weight"].shape
        head: nn.Module = LVRHead(dim, inner)
        variant = "simple"
    elif GLU_KEYS <= keys and keys <= GLU_KEYS | {"gate_proj.bias", "up_proj.bias", "down_proj.bias"}:
        inner, dim = tensors["gate_proj.weight"].shape
        head = LVRHeadGLU(dim, inner, hidden_act, bias="gate_proj.bias" in keys)
        variant = "glu"
    else:
        raise LatentProbeError(
            f"the lvr_head weights have keys {sorted(keys)}, neither LVR's LVRHead ({sorted(SIMPLE_KEYS)}) nor its "
            f"LVRHeadGLU ({sorted(GLU_KEYS)} with optional biases)",
            "check the checkpoint against VincentLeebang/lvr src/model/lvr_heads.py")
    head.load_state_dict(tensors)
    return head, variant


def attach_feedback_head(subject, folder: Path) -> bool:
    """Load LVR's optional head from the checkpoint's safetensors onto ``subject.model`` (as the protocol's
    ``head_module``), in the model's device and dtype. Returns whether the checkpoint had one."""
    module = subject.protocol.head_module
    tensors = read_head_tensors(Path(folder), module)
    if not tensors:
        return False
    hidden_act = getattr(subject.model.config.get_text_config(), "hidden_act", "silu")
    head, variant = build_head(tensors, hidden_act)
    param = next(subject.model.parameters())
    head.to(device=param.device, dtype=param.dtype).eval()
    head.variant = variant
    subject.model.add_module(module, head)
    return True
