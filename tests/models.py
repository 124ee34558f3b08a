"""Tiny real architectures built from transformers configs with random weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
    return lambda: GPT2LMHeadModel(config)


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=512, max_position_embeddings=64)
    return lambda: BertModel(config)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=512, max_position_embeddings=64)
    return lambda: LlamaForCausalLM(config)


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return lambda: ResNetForImageClassification(config)


def tiny_vit():
    """transformers 5 saves ViT in the old layout (encoder.layer.N.attention.attention.query)
    and renames on load (layers.N.attention.q_proj): the adapters must rename as well."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=10)
    return lambda: ViTForImageClassification(config)


FACTORIES: dict[str, Callable[[], Callable[[], torch.nn.Module]]] = {
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "llama": tiny_llama,
    "resnet": tiny_resnet,
    "vit": tiny_vit,
}


def build(kind: str, directory: Path, seed: int = 0) -> tuple[torch.nn.Module, Callable[[], torch.nn.Module]]:
    """Build a tiny model with seeded random weights and save it as a Hugging Face directory."""
    factory = FACTORIES[kind]()
    torch.manual_seed(seed)
    model = factory().eval()
    _randomize_buffers(model, seed)
    model.save_pretrained(directory)
    return model, factory


def _randomize_buffers(model: torch.nn.Module, seed: int) -> None:
    """Give stored buffers (BatchNorm statistics) values a fresh build would not have."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and "running" in name:
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


def example_input(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if kind in ("resnet", "vit"):
        return {"pixel_values": torch.rand(1, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(0, 512, (1, 12), generator=generator)}


def output_of(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**example_input(kind))
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


class TiedWithConstant(torch.nn.Module):
    """What torch.export archives hold beyond parameters: a tied weight, a buffer, a constant."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(width, width)
        self.decode = torch.nn.Linear(width, width)
        self.decode.weight = self.encode.weight
        self.norm = torch.nn.BatchNorm1d(width)
        self.register_buffer("offset", torch.linspace(-1, 1, width))
        self.scale = torch.rand(width) + 0.5  # a plain tensor attribute: exported as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.relu(self.norm(self.encode(x)))) * self.scale + self.offset


def export_archive(path: Path, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ``torch.export.save`` archive of a seeded TiedWithConstant; the module and an input."""
    torch.manual_seed(seed)
    model = TiedWithConstant().eval()
    _randomize_buffers(model, seed)
    example = torch.randn(4, 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return model, example


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte, hostile or not."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    length = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path
