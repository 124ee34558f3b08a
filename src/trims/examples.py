"""Example architectures for the demo and the benchmarks: real configs, random weights.

Nothing is downloaded: each model is built from its published configuration with random
weights and saved as a Hugging Face directory (safetensors + config.json). Needs the
``transformers`` extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Example:
    name: str
    model_class: str  # "transformers.GPT2LMHeadModel"
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    input_kind: str = "tokens"  # or "image"
    description: str = ""

    def make_config(self):
        return _attribute(self.config_class)(**self.config)

    def factory(self) -> Callable[[], Any]:
        """A function building this architecture (with random init) in the example's dtype."""
        from .torch import default_dtype

        config, cls = self.make_config(), _attribute(self.model_class)

        def build():
            with default_dtype(self.dtype):  # build in the final dtype: no fp32 copy on the way
                return cls(config)

        return build

    def example_input(self) -> dict[str, Any]:
        import torch

        generator = torch.Generator().manual_seed(0)
        if self.input_kind == "image":
            size = self.config.get("image_size", 224)
            return {"pixel_values": torch.rand(1, 3, size, size, generator=generator)}
        vocab = self.make_config().vocab_size
        return {"input_ids": torch.randint(0, vocab, (1, 16), generator=generator)}

    def build(self, directory: Path, seed: int = 0) -> Path:
        """Build with seeded random weights and save as a Hugging Face model directory."""
        import torch

        torch.manual_seed(seed)
        model = self.factory()().eval()
        model.save_pretrained(directory)
        return directory


def _attribute(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_GPT2 = ("transformers.GPT2LMHeadModel", "transformers.GPT2Config")
_BERT = ("transformers.BertModel", "transformers.BertConfig")
_LLAMA = ("transformers.LlamaForCausalLM", "transformers.LlamaConfig")
_RESNET = ("transformers.ResNetForImageClassification", "transformers.ResNetConfig")

EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in [
        Example("gpt2-tiny", *_GPT2, dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0),
                description="2-layer GPT-2, 0.5 MB: for tests"),
        Example("gpt2", *_GPT2, description="GPT-2 small, 124M parameters, fp32"),
        Example("gpt2-large", *_GPT2, dict(n_layer=36, n_embd=1280, n_head=20),
                description="GPT-2 large, 774M parameters, fp32"),
        Example("bert-base", *_BERT, description="BERT base, 110M parameters, fp32"),
        Example("resnet50", *_RESNET, input_kind="image", description="ResNet-50, 25.6M parameters, fp32"),
        Example("llama-1b", *_LLAMA,
                dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                     tie_word_embeddings=True, rope_theta=500000.0),
                dtype="bfloat16", description="Llama 3.2 1B shape, 1.24B parameters, bf16"),
    ]
}
