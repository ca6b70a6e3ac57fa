"""Trainable LoKr and DoRA adapters built from PEFT's own tuner layers, over the model's Linear modules.

Plain LoRA (and rsLoRA) keeps the fused fast path of `LoraTrainable`. The other algorithms use PEFT's layers
(`peft.tuners.lokr.layer.Linear`, `peft.tuners.lora.layer.Linear` with `use_dora`): PEFT initialises them,
builds the Kronecker product, the DoRA magnitude and its weight norm. Each PEFT layer is built around the SAME
base Linear the model holds, but the model is never restructured: no child is swapped and no hook is added.
The PEFT layers live in this object only; `klein_forward` routes every target Linear's output through
`apply(name, x, y)`, which adds the PEFT layer's extra output to `y = base(x)` (the base is not run twice).

LoKr: y + x ΔWᵀ with ΔW = kron(w1, w2) · alpha/rank (PEFT's `get_delta_weight`).
DoRA: y + (m/‖W + s·BA‖ − 1) · y + m/‖W + s·BA‖ · s · B(A(x)), the norm per output row and detached (PEFT's
`DoraLinearLayer.forward`), s = alpha/rank.

Adapter parameters are fp32 master weights whatever the base dtype (PEFT would cast them to the base's bf16),
and are seeded: the same seed gives the same initial adapter on any device.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter_math import DORA_NORM_KEY
from .lora_file import PREFIX

ADAPTER = "default"  # PEFT's adapter name inside each layer
PEFT_ALGORITHMS = ("lokr", "dora")


def _key(name: str, param: str) -> str:
    # nn.ParameterDict keys may not contain '.'; module and parameter names do.
    return f"{name}::{param}".replace(".", "__")


def _lokr_layer(base: nn.Module, rank: int, alpha: float, factor: int) -> nn.Module:
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    # init_weights True: w1 starts at zero (PEFT's default), so a fresh LoKr leaves the model's output unchanged.
    config = LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, init_weights=True)
    return LoKrLinear(base, ADAPTER, config=config, r=rank, alpha=alpha)


def _dora_layer(base: nn.Module, rank: int, alpha: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, lora_dropout=0.0, init_lora_weights=True)
    return LoraLinear(base, ADAPTER, config=config, r=rank, lora_alpha=alpha)


def _adapter_parameters(layer: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """The layer's own parameters, never its base layer's."""
    return ((n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer."))


class PeftTrainable(nn.Module):
    """A trainable LoKr or DoRA over target Linear modules of a Klein model, through PEFT's tuner layers."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        algorithm: str,
        rank: int,
        alpha: float,
        lokr_factor: int = -1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if algorithm not in PEFT_ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r}: PeftTrainable trains one of {PEFT_ALGORITHMS}.")
        self.algorithm, self.rank, self.alpha, self.lokr_factor = algorithm, rank, float(alpha), lokr_factor
        self.names = tuple(sorted(names))
        self.params = nn.ParameterDict()
        # A plain dict, not submodules: each PEFT layer holds the model's Linear as its child, and registering it
        # here would put the base weights into this object's parameters, state_dict and train()/eval() calls.
        self._layers: dict[str, nn.Module] = {}
        self._modules_of: dict[str, nn.Module] = {}
        # PEFT initialises with the global generator: fork it, so the run's draws come from the seed alone and the
        # caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name in self.names:
                base = model.get_submodule(name)
                if algorithm == "dora" and base.weight.element_size() < 2:
                    raise ValueError(
                        f"DoRA needs the model's weights in bf16, fp16 or fp32 to take their norm; {name!r} holds "
                        f"{base.weight.dtype}. Fix: load the model with weight_dtype 'default', or train 'lora' or "
                        "'lokr'."
                    )
                with torch.device("cpu"):  # init on the CPU: the same numbers on every device
                    layer = (
                        _lokr_layer(base, rank, alpha, lokr_factor)
                        if algorithm == "lokr"
                        else _dora_layer(base, rank, alpha)
                    )
                self._layers[name] = layer
                self._modules_of[name] = base
                for pname, p in _adapter_parameters(layer):
                    # fp32 master weights on the run's device (PEFT cast them to the base's dtype).
                    p.data = p.data.to(device=device, dtype=torch.float32)
                    self.params[_key(name, pname)] = p  # the same Parameter object PEFT's layer computes with

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer(self, name: str) -> nn.Module:
        return self._layers[name]

    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y (= base(x)) plus this module's adapter output, through PEFT's layer math."""
        layer = self._layers.get(name)
        if layer is None:
            return y
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.float32)  # the adapters compute in fp32 (their master dtype) unless autocast decides
        if self.algorithm == "lokr":
            delta = layer.get_delta_weight(ADAPTER)  # [out, in], alpha/rank included
            return y + F.linear(x, delta).to(y.dtype)
        extra = layer.lora_magnitude_vector[ADAPTER](
            x,
            lora_A=layer.lora_A[ADAPTER],
            lora_B=layer.lora_B[ADAPTER],
            scaling=layer.scaling[ADAPTER],
            base_layer=self._modules_of[name],
            base_result=y,
        )
        return y + extra.to(y.dtype)

    # -- files ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The adapter under the keys core's LoraLoader and LyCORIS read, relative names prefixed
        `diffusion_model.`; alpha fp32, the rest in `dtype` (default: as trained).

        LoKr: `lokr_w1` and `lokr_w2` (or `lokr_w2_a`/`lokr_w2_b` when PEFT factored w2) + `.alpha`. Core and
        LyCORIS scale by alpha/rank only when a factor is low-rank; with both full matrices their scale is 1, so
        PEFT's alpha/rank is folded into w1 there (the file then says alpha = rank).
        DoRA: `lora_A.weight`, `lora_B.weight`, `.alpha` and `dora_scale` [out, 1] (a [out] vector would broadcast
        wrongly in core's merge). PEFT divides its magnitude m by the merged weight's row norm ‖W + s·BA‖, core's
        LoraLoader by the base weight's ‖W‖: the file stores m·‖W‖/‖W + s·BA‖, which gives PEFT's trained W' in
        core, and says so in its header (DORA_NORM_KEY) for the pack's reader."""
        out: dict[str, Tensor] = {}

        def put(key: str, t: Tensor) -> None:
            out[key] = t.detach().to("cpu", dtype or t.dtype).contiguous()

        for name in self.names:
            layer, p = self._layers[name], f"{PREFIX}{name}."
            if self.algorithm == "lokr":
                factored = ADAPTER in layer.lokr_w2_a
                w1 = layer.lokr_w1[ADAPTER]
                put(p + "lokr_w1", w1 if factored else w1 * self.scale)
                if factored:
                    put(p + "lokr_w2_a", layer.lokr_w2_a[ADAPTER])
                    put(p + "lokr_w2_b", layer.lokr_w2_b[ADAPTER])
                else:
                    put(p + "lokr_w2", layer.lokr_w2[ADAPTER])
                alpha = self.alpha if factored else float(self.rank)
            else:
                put(p + "lora_A.weight", layer.lora_A[ADAPTER].weight)
                put(p + "lora_B.weight", layer.lora_B[ADAPTER].weight)
                dora = layer.lora_magnitude_vector[ADAPTER]
                base = self._modules_of[name].weight.detach().float()
                lora_weight = layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float()
                merged_norm = dora.get_weight_norm(base, lora_weight, self.scale)  # [out], PEFT's own
                put(p + "dora_scale", (dora.weight.float() * base.norm(dim=1) / merged_norm).reshape(-1, 1))
                alpha = self.alpha
            out[p + "alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out

    def network_metadata(self) -> dict[str, str]:
        """kohya / LyCORIS header keys that name the algorithm (shown by tools that list LoRA files)."""
        if self.algorithm == "lokr":
            args = {"algo": "lokr", "factor": str(self.lokr_factor)}
            module = "lycoris.kohya"
        else:
            args = {"dora_wd": "True"}
            module = "networks.lora"
        extra = {DORA_NORM_KEY: "base"} if self.algorithm == "dora" else {}
        return {
            **extra,
            "ss_network_module": module,
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": f"{self.alpha:g}",
            "ss_network_args": json.dumps(args),
        }

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params.values())
