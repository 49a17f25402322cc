"""Pretrained weights into vlfast's encoders: a Hugging Face BERT folder, a timm/DeiT ViT file.

Every weight of the model is filled, or loading stops with the keys named: a checkpoint that
fits only in part would otherwise train a silently half-random model (the hub's
bert-base-uncased names its LayerNorms gamma/beta, which a plain load_state_dict skips). Allowed
to stay as initialised: what BERT never had (the fusion layers' cross-attention) and, from a
bare BertModel checkpoint, the MLM head. Checkpoint weights the model has no place for (BERT's
pooler and NSP head, a ViT's classifier) are skipped and listed in the summary.
"""
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from vlfast.models.vit import resample_pos_embed

# The TensorFlow-era names that transformers renames when it loads a checkpoint
# (transformers/conversion_mapping.py, "legacy"); the other legacy renames there (weight norm's
# weight_g/weight_v, multimodal prefixes) do not occur in BERT.
LEGACY_LAYER_NORM = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
# Wrappers around a ViT state dict: DeiT/MAE save {"model": ...}, timm's train script
# {"state_dict": ..., "state_dict_ema": ...}. The trained weights come before their EMA.
VISION_WRAPPERS = ("model", "state_dict", "state_dict_ema", "model_ema")


def read_state_dict(path) -> dict:
    """A .safetensors or torch file; weights_only: a downloaded file cannot run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_folder(directory) -> tuple:
    """(state dict, the file it came from) of a Hugging Face model folder, whole or sharded,
    safetensors before pytorch_model.bin as transformers prefers."""
    directory = Path(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name), directory / name
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(directory / shard).items()}, index
    raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or a sharded *.index.json of them")


def listed(keys, most: int = 20) -> str:
    keys = list(keys)
    return ", ".join(keys[:most]) + (f" ... ({len(keys) - most} more)" if len(keys) > most else "")


def load_checked(module: nn.Module, state: dict, what: str, may_miss: Callable[[str], Optional[str]],
                 no_place: Callable[[str], bool], notes=()) -> str:
    """Load ``state`` into ``module`` after checking that it fills every weight (bar those
    ``may_miss`` gives a reason for) and that each of its weights lands (bar those ``no_place``
    accepts). Raises ValueError naming every problem; returns a one-line summary."""
    model_state = module.state_dict(keep_vars=True)
    # A tied weight appears under several names (the MLM decoder is the word embedding matrix,
    # its bias cls.predictions.bias): a checkpoint may hold it under any of them, if they agree.
    tied = {}
    for key, tensor in model_state.items():
        tied.setdefault(id(tensor), []).append(key)
    for names in tied.values():
        held = [name for name in names if name in state]
        if any(not torch.equal(state[held[0]], state[name]) for name in held[1:]):
            raise ValueError(f"{what}: {' and '.join(held)} are one tied weight in vlfast but differ in the checkpoint")
        if held:
            state.update({name: state[held[0]] for name in names})
    weights = [names[0] for names in tied.values()]  # one name per weight
    missing = {key: may_miss(key) for key in weights if key not in state}
    kept = Counter(reason for reason in missing.values() if reason)
    problems = []
    if not all(missing.values()):
        problems.append("missing from the checkpoint: " + listed(key for key, reason in missing.items() if not reason))
    shapes = [f"{key} {tuple(state[key].shape)} in the checkpoint, {tuple(model_state[key].shape)} in the model"
              for key in weights if key in state and state[key].shape != model_state[key].shape]
    if shapes:
        problems.append("shape mismatch: " + listed(shapes))
    extra = [key for key in state if key not in model_state]
    if [key for key in extra if not no_place(key)]:
        problems.append("matching no weight of the model: " + listed(key for key in extra if not no_place(key)))
    if problems:
        raise ValueError(f"{what} do not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict({key: value for key, value in state.items() if key in model_state}, strict=False)
    return (f"{what}: {len(weights) - len(missing)} loaded" + "".join(f"; {note}" for note in notes)
            + (f"; kept as initialised: {', '.join(f'{n} {reason}' for reason, n in kept.items())}" if kept else "")
            + (f"; no place in the model, skipped: {listed(sorted(extra))}" if extra else ""))


def load_text_weights(text_encoder: nn.Module, directory) -> str:
    """A Hugging Face BERT folder (saved from BertModel, BertForMaskedLM or BertForPreTraining)
    into vlfast's BertForMaskedLM. Returns the summary line."""
    raw, source = read_hf_folder(directory)
    # A BertModel checkpoint names its weights without the `bert.` prefix (transformers adds or
    # strips base_model_prefix, whichever way the checkpoint and the model differ).
    prefix = "" if any(key.startswith("bert.") for key in raw) else "bert."
    state, renamed = {}, 0
    for key, value in raw.items():
        for old, new in LEGACY_LAYER_NORM.items():
            if key.endswith(old):
                key, renamed = key[:-len(old)] + new, renamed + 1
        state[prefix + key] = value
    has_head = any(key.startswith("cls.predictions.") for key in state)

    def may_miss(key):
        if ".crossattention." in key:
            return "fusion cross-attention weights (new in vlfast)"
        if key.startswith("cls.predictions.") and not has_head:
            return "MLM head weights (the checkpoint has none: a BertModel's)"

    def no_place(key):  # outside the encoder and MLM head vlfast has: the pooler, NSP head, buffers
        return (not key.startswith(("bert.", "cls.predictions.")) or key.startswith("bert.pooler.")
                or key.endswith(("position_ids", "token_type_ids")))

    notes = [f"{renamed} LayerNorm gamma/beta renamed weight/bias"] if renamed else []
    return load_checked(text_encoder, state, f"text weights from {source}", may_miss, no_place, notes)


def load_vision_weights(visual_encoder: nn.Module, path) -> str:
    """A timm or DeiT ViT state dict file (raw or under a wrapper key, DDP's `module.` prefixes
    or not, .safetensors or torch) into vlfast's VisionTransformer. Returns the summary line."""
    state, notes = read_state_dict(path), []
    wrapper = next((key for key in VISION_WRAPPERS if isinstance(state.get(key), dict)), None)
    if wrapper:
        state, notes = state[wrapper], [f"under {wrapper!r}"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if "dist_token" in state and "pos_embed" in state:
        # A distilled DeiT has two prefix tokens, [CLS] then the distillation token; vlfast only
        # [CLS]: the distillation token goes (listed), and with it its position embedding.
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
        notes.append("distillation token's position embedding dropped")
    ours = visual_encoder.pos_embed.shape
    if "pos_embed" in state and state["pos_embed"].shape[1] != ours[1] and state["pos_embed"].shape[2] == ours[2]:
        # Another resolution: resampled here (as the model's load hook would) so the shape check passes.
        notes.append(f"pos_embed resampled from {state['pos_embed'].shape[1] - 1} to {ours[1] - 1} patches")
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], visual_encoder.config.grid)
    classifier = not isinstance(visual_encoder.head, nn.Identity)

    def no_place(key):  # the classifier when the model has none; a distilled DeiT's second head
        return (key == "dist_token" or key.startswith("head_dist.")
                or (not classifier and key.startswith(("head.", "pre_logits."))))

    return load_checked(visual_encoder, state, f"vision weights from {path}", lambda key: None, no_place, notes)
