"""Which files of a model directory make the model.

A directory on this node and a "directory" in a bucket are the same Hugging Face layout, so
one function chooses for both (:func:`files_of_directory`); the callers only list the directory and
read its index, each its own way. Choosing twice, differently, let a bucket directory push
what the same directory on disk would refuse, or refuse what it would push.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

from .errors import InvalidModel
from .torch_format import SUFFIXES as CHECKPOINT_SUFFIXES

__all__ = ["INDEX_FILES", "SIDE_SUFFIXES", "TRAINER_STATE", "files_of_directory"]

INDEX_FILES = ("model.safetensors.index.json",)
# What transformers' Trainer saves beside a model's weights: its arguments and training state.
TRAINER_STATE = re.compile(r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")
SIDE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".onnx")  # kept beside the weights


def files_of_directory(names: Iterable[str], read_index: Callable[[str], bytes], where: str, *,
                       split_onnx: bool = False) -> list[str]:
    """The names, of the plain files ``names`` directly in the directory ``where`` (a path or
    a URL, for messages), that make the model: its weights first, then its side files.

    The weights are the shards a ``model.safetensors.index.json`` names (read with
    ``read_index(name)``), else every ``.safetensors`` file, else one PyTorch checkpoint.
    ``split_onnx``: the directory is an ONNX model split for the push, its graphs side files.
    Raises :class:`~trims.errors.InvalidModel`, saying what to push instead.
    """
    names = sorted(set(names))
    graphs = [n for n in names if _suffix(n).lower() == ".onnx"]
    if graphs and not split_onnx:  # stored whole as a side file, its weights would be shared with no one
        raise InvalidModel(f"{where} holds {graphs[0]}, an ONNX model: {_onnx_hint(where, graphs[0])}")
    weights = _weight_files(names, read_index, where)
    side = [n for n in names if _suffix(n) in SIDE_SUFFIXES and not n.endswith(".index.json")]
    return weights + side


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix


def _onnx_hint(where: str, graph: str) -> str:
    if "://" in where:  # only a client splits a graph from its weights, and only a local file
        return (f"copy {graph} to this node and push it (trims push {graph} --name NAME), which splits its "
                "weights from its graph")
    return f"push the .onnx file itself (trims push {where}/{graph} --name NAME), which splits its weights from its graph"


def _weight_files(names: list[str], read_index: Callable[[str], bytes], where: str) -> list[str]:
    index = next((n for n in INDEX_FILES if n in names), None)
    if index is None:
        return [n for n in names if n.endswith(".safetensors")] or _one_checkpoint(names, where)
    try:
        weight_map = json.loads(read_index(index))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidModel(f"{where}/{index} is not a safetensors index: {exc}") from None
    # Only what the index names: a Mistral-style directory also holds consolidated.safetensors,
    # the same tensors again under other names.
    missing = [n for n in shards if n not in names]
    if missing:
        raise InvalidModel(f"{index} lists {missing[0]}, which is not in {where}")
    return shards


def _one_checkpoint(names: list[str], where: str) -> list[str]:
    """A directory's weights where it holds no safetensors: one PyTorch checkpoint
    (``pytorch_model.bin`` beside its config, as transformers saved before safetensors)."""
    checkpoints = [n for n in names if _suffix(n) in CHECKPOINT_SUFFIXES and not TRAINER_STATE.fullmatch(n)]
    if "pytorch_model.bin" in checkpoints:  # transformers' name for the weights, whatever else lies beside
        return ["pytorch_model.bin"]
    if len(checkpoints) == 1:
        return checkpoints
    if checkpoints:
        raise InvalidModel(f"{where} holds several PyTorch checkpoints ({', '.join(checkpoints[:3])}), and a model's "
                           "weights are one: save them as safetensors (model.safetensors, or shards with their "
                           "index), or push each file by itself")
    raise InvalidModel(f"{where} holds no .safetensors file and no PyTorch checkpoint")
