"""What a resume point holds beside the weights, without pickle: the optimizer's state as safetensors + JSON, the
trainer's step and the scheduler as JSON; and the digest of a round's examples (part of its identity)."""

import hashlib
import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = [  # what the package re-exports
    "OPTIMIZER_SCALARS",
    "OPTIMIZER_TENSORS",
    "SCHEDULER_STATE",
    "TRAINER_STATE",
    "examples_digest",
    "optimizer_state_files",
    "optimizer_state_from_files",
]

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SCALARS = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"


def optimizer_state_files(state_dict: dict) -> dict[str, bytes]:
    """An optimizer state dict as safetensors (its tensors, keyed 'param.name') + JSON (everything else)."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    document = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return {OPTIMIZER_TENSORS: save_safetensors(tensors), OPTIMIZER_SCALARS: json.dumps(document).encode()}


def optimizer_state_from_files(tensor_bytes: bytes, scalar_bytes: bytes) -> dict:
    """The inverse of `optimizer_state_files`. Parameters are keyed by index (a plain optimizer) or by name (the
    full state of a sharded one, see `engines.FSDPEngine.optimizer_state`)."""
    document = json.loads(scalar_bytes)
    state: dict[int | str, dict] = {}

    def key_of(param: str) -> int | str:
        return int(param) if param.isdigit() else param

    for key, value in load_safetensors(tensor_bytes).items():
        param, name = key.rsplit(".", 1)
        state.setdefault(key_of(param), {})[name] = value
    for param, values in document["scalars"].items():
        state.setdefault(key_of(param), {}).update(values)
    return {"state": state, "param_groups": document["param_groups"]}


def examples_digest(encoded: list[dict]) -> str:
    """A digest of the encoded examples (token ids, weights, rewards): part of a round's identity."""
    sha = hashlib.sha256()
    for example in encoded:
        for key in sorted(example):
            value = example[key]
            sha.update(key.encode())
            sha.update(value.cpu().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return sha.hexdigest()[:16]
