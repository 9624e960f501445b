"""torch.compile for training and generation, with an eager fall-back that never crashes a run.

Training compiles each decoder layer in place (``layer.compile()``, as torchtune does): module paths,
state_dict keys and adapter files stay exactly the eager ones, gradient checkpointing keeps wrapping
each layer (the recompute in backward reruns the compiled forward), and all layers share one graph
because dynamo treats a layer's parameters as inputs. The embedding, the final norm and the chunked
loss stay eager: they run once per step and the loss has data-dependent chunk shapes.

A machine without a working compiler (no C++ toolchain for inductor on CPU, no Triton on a GPU) is
found by compiling and running a tiny forward + backward on the training device before the run
starts; then training goes on eager after one warning line.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def compiler_problem(device: torch.device | str) -> str | None:
    """Why torch.compile (inductor) cannot compile and run a forward + backward on ``device``, or None."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(x) * 2.0 + x).sum()

    try:
        x = torch.randn(16, device=device, requires_grad=True)
        torch.compile(probe, backend="inductor", fullgraph=True)(x).backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "the compiled probe gave no finite gradient"
    except Exception as e:  # noqa: BLE001 -- any failure here means "no working compiler"
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")
    return None


def compile_decoder_layers(model: nn.Module, device: torch.device | str, what: str = "train.compile"
                           ) -> bool:
    """Compile every ``model.model.layers[i]`` in place; False (after one warning) if it cannot work here."""
    problem = compiler_problem(device)
    if problem is not None:
        warnings.warn(f"{what}: true, but torch.compile does not work on this machine ({problem}); "
                      "running eager instead", stacklevel=2)
        return False
    for layer in model.model.layers:
        layer.compile()
    return True
