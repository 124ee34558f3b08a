"""The model zoo of the FaaS evaluation: real architectures from configs, random weights.

The paper served 37 image classifiers of 4.8-549 MB plus "large" ones up to 6.4 GB. This zoo
spans the same range with the architectures people serve today: the paper's classics
(SqueezeNet, AlexNet, VGG), ResNets from 18 to 152 layers, ResNeXt-style grouped convolutions
(RegNet), BiT, EfficientNet, MobileNet and ConvNeXt for images; DistilBERT, BERT and
GPT-2 for text; and 1.4-3.1 GB language models as the large ones. Nothing is downloaded: each
is built once with seeded random weights and cached as a directory of safetensors.

Scales (``--zoo``): ``full`` (26 models, 10.8 GiB on disk), ``small`` (no model over 600 MB: 23
models, 4.4 GiB, for machines with less than about 16 GB of memory) and ``tiny`` (3 toy models
built in a second, for the CI miniature).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trims.examples import EXAMPLES, Example

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooModel:
    name: str
    kind: str  # "classic:<class>[:<arg>]" for bench/faas/classic.py, else a trims.examples.Example
    example: Example | None = None
    input_kind: str = "image"
    image_size: int = 224
    tokens: int = 8
    scales: tuple[str, ...] = ("full", "small")

    def factory(self) -> Callable[[], Any]:
        if self.example is not None:
            return self.example.factory()
        import classic

        _, cls, *arg = self.kind.split(":")
        return lambda: getattr(classic, cls)(*map(int, arg))

    def example_input(self) -> dict[str, Any]:
        import torch

        generator = torch.Generator().manual_seed(0)
        if self.input_kind == "image":
            return {"pixel_values": torch.rand(1, 3, self.image_size, self.image_size, generator=generator)}
        vocab = self.example.make_config().vocab_size
        return {"input_ids": torch.randint(0, vocab, (1, self.tokens), generator=generator)}

    def build(self, directory: Path) -> None:
        """Random weights seeded by the model's name (one seed for all would give models with
        layers of the same shape identical tensors, which trims would store once), saved as
        safetensors (with config.json if from transformers)."""
        import torch
        from safetensors.torch import save_file

        seed = zlib.crc32(self.name.encode())
        if self.example is not None:
            self.example.build(directory, seed)
            return
        torch.manual_seed(seed)
        model = self.factory()().eval()
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")


def _hf(name: str, model_class: str, config_class: str, config: dict | None = None, *, dtype: str = "float32",
        input_kind: str = "image", scales: tuple[str, ...] = ("full", "small"), example: str | None = None) -> ZooModel:
    built = EXAMPLES[example] if example else Example(name, f"transformers.{model_class}", f"transformers.{config_class}",
                                                      config or {}, dtype=dtype, input_kind=input_kind)
    return ZooModel(name, "transformers", built, input_kind=input_kind, scales=scales)


def _resnet(name: str, layer_type: str, depths: list[int]) -> ZooModel:
    sizes = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return _hf(name, "ResNetForImageClassification", "ResNetConfig",
               dict(layer_type=layer_type, depths=depths, hidden_sizes=sizes, num_labels=1000))


def _efficientnet(name: str, width: float, depth: float, top_width: int) -> ZooModel:
    # transformers does not derive the top layer's width (hidden_dim) from the width coefficient
    return _hf(name, "EfficientNetForImageClassification", "EfficientNetConfig",
               dict(width_coefficient=width, depth_coefficient=depth, hidden_dim=top_width, num_labels=1000))


def _gpt2(name: str, layers: int, width: int, heads: int, scales: tuple[str, ...] = ("full", "small")) -> ZooModel:
    return _hf(name, "GPT2LMHeadModel", "GPT2Config", dict(n_layer=layers, n_embd=width, n_head=heads),
               input_kind="tokens", scales=scales)


_IMAGE_LABELS = dict(num_labels=1000)
ZOO: list[ZooModel] = [
    ZooModel("squeezenet1.1", "classic:SqueezeNet"),
    _hf("mobilenet-v2", "MobileNetV2ForImageClassification", "MobileNetV2Config", _IMAGE_LABELS),
    _hf("mobilenet-v1", "MobileNetV1ForImageClassification", "MobileNetV1Config", _IMAGE_LABELS),
    _efficientnet("efficientnet-b0", 1.0, 1.0, 1280),
    _resnet("resnet18", "basic", [2, 2, 2, 2]),
    _efficientnet("efficientnet-b3", 1.2, 1.4, 1536),
    _hf("regnet-y-4gf", "RegNetForImageClassification", "RegNetConfig", _IMAGE_LABELS),  # grouped, ResNeXt-style
    _resnet("resnet34", "basic", [3, 4, 6, 3]),
    _hf("resnet50", "", "", example="resnet50"),
    _hf("bit-50", "BitForImageClassification", "BitConfig", _IMAGE_LABELS),  # ResNet v2 (pre-activation)
    _efficientnet("efficientnet-b5", 1.6, 2.2, 2048),
    _hf("convnext-tiny", "ConvNextForImageClassification", "ConvNextConfig", _IMAGE_LABELS),
    _resnet("resnet101", "bottleneck", [3, 4, 23, 3]),
    ZooModel("alexnet", "classic:AlexNet"),
    _resnet("resnet152", "bottleneck", [3, 8, 36, 3]),
    _efficientnet("efficientnet-b7", 2.0, 3.1, 2560),
    _hf("distilbert", "DistilBertModel", "DistilBertConfig", input_kind="tokens"),
    _hf("convnext-small", "ConvNextForImageClassification", "ConvNextConfig",
        dict(depths=[3, 3, 27, 3], num_labels=1000)),
    _hf("convnext-base", "ConvNextForImageClassification", "ConvNextConfig",
        dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3], num_labels=1000)),
    _hf("bert-base", "", "", input_kind="tokens", example="bert-base"),
    _hf("gpt2", "", "", input_kind="tokens", example="gpt2"),
    ZooModel("vgg16", "classic:VGG:16"),
    ZooModel("vgg19", "classic:VGG:19"),
    _gpt2("gpt2-medium", 24, 1024, 16, scales=("full",)),
    _hf("llama-1b", "", "", input_kind="tokens", example="llama-1b", scales=("full",)),
    _hf("gpt2-large", "", "", input_kind="tokens", example="gpt2-large", scales=("full",)),
    # The CI miniature: real architectures, toy sizes.
    _hf("gpt2-tiny", "", "", input_kind="tokens", example="gpt2-tiny", scales=("tiny",)),
    _hf("resnet-tiny", "ResNetForImageClassification", "ResNetConfig",
        dict(layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=10),
        scales=("tiny",)),
    _hf("bert-tiny", "BertModel", "BertConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=512),
        input_kind="tokens", scales=("tiny",)),
]
BY_NAME = {model.name: model for model in ZOO}
SCALES = ("full", "small", "tiny")


def zoo(scale: str) -> list[ZooModel]:
    return [model for model in ZOO if scale in model.scales]


def ensure_built(models: list[ZooModel], cache: Path) -> dict[str, Path]:
    """Each model's directory, building the missing ones, each in a fresh process (its memory
    gone when it ends) and renamed into place when complete; several at a time on a machine
    with the cores and memory for it (one per 4 cores and 12 GiB)."""
    directories = {model.name: cache / model.name for model in models}
    missing = [model.name for model in models if not weight_files(directories[model.name])]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    jobs = max(1, min((os.cpu_count() or 1) // 4, memory // (12 << 30)))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda name: _build(name, cache), missing))  # list(): a failed build raises here
    return directories


def _build(name: str, cache: Path) -> None:
    print(f"building {name} ...", flush=True)
    partial = cache / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-c", _BUILD, name, str(partial)], env=child_env(), check=True)
    shutil.rmtree(cache / name, ignore_errors=True)
    partial.rename(cache / name)


_BUILD = "import sys, zoo; from pathlib import Path; zoo.BY_NAME[sys.argv[1]].build(Path(sys.argv[2]))"


def child_env() -> dict[str, str]:
    """The environment for children that import this package's modules and trims from source."""
    paths = [str(HERE), str(HERE.parent.parent / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def weight_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in weight_files(directory))
