"""Unchanged scripts under `trims run`: their tensors live in the store, their outputs do not change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from .conftest import ROOT
from .models import build, export_archive

PRELUDE = """
import collections, json, sys, torch
from tests.mapped import in_store
directory = sys.argv[1]
"""

# Each script is ordinary user code: nothing in it mentions trims.
SCRIPTS = {
    "safetensors.torch.load_file": """
        from safetensors.torch import load_file
        from tests.models import tiny_gpt2, output_of
        state = load_file(directory + "/model.safetensors")
        model = tiny_gpt2()()
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        result = {"output": output_of(model.eval(), "gpt2").flatten().tolist(),
                  "shared": in_store(state["transformer.wte.weight"].data_ptr())}
    """,
    "safe_open, torch, get_slice": """
        from safetensors import safe_open
        with safe_open(directory + "/model.safetensors", framework="pt") as f:
            state = {k: f.get_slice(k)[...] for k in f.keys()}
            metadata = f.metadata()
        # Tensors equal to another (a random init's zero biases) are stored once, handed out as copies.
        alike = collections.Counter(t.numpy().tobytes() for t in state.values())
        result = {"output": [float(state[k].double().sum()) for k in sorted(state)],
                  "shared": all(in_store(t.data_ptr()) for t in state.values() if alike[t.numpy().tobytes()] == 1),
                  "metadata": metadata}
    """,
    "safe_open, numpy": """
        from safetensors import safe_open
        with safe_open(directory + "/model.safetensors", framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            columns = f.get_slice("transformer.wte.weight")[:, 1:3]  # contiguous, as safetensors slices
        arrays["transformer.wte.weight"][0, 0] = 42.0  # numpy callers may write: on a private copy
        result = {"output": [float(arrays[k].astype("float64").sum()) for k in sorted(arrays)]
                            + [bool(columns.flags.c_contiguous)] + columns.flatten().tolist(),
                  "shared": in_store(arrays["transformer.h.0.mlp.c_fc.weight"].ctypes.data)}
    """,
    "safetensors.numpy.load_file": """
        from safetensors.numpy import load_file
        arrays = load_file(directory + "/model.safetensors")
        result = {"output": [float(arrays[k].astype("float64").sum()) for k in sorted(arrays)],
                  "shared": in_store(arrays["transformer.wte.weight"].ctypes.data)}
    """,
    "safetensors.flax.load_file": """
        import jax.numpy as jnp
        from safetensors.flax import load_file
        arrays = load_file(directory + "/model.safetensors")
        result = {"output": [float(jnp.sum(arrays[k])) for k in sorted(arrays)],
                  "shared": in_store(arrays["transformer.wte.weight"].unsafe_buffer_pointer())}
    """,
    "safe_open, flax": """
        from safetensors import safe_open
        with safe_open(directory + "/model.safetensors", framework="flax") as f:
            arrays = f.get_tensors()  # as safetensors' own flax.load_file reads
            rows = f.get_slice("transformer.wte.weight")[2:5]
            one = f.get_tensor("transformer.h.0.mlp.c_fc.weight")
        result = {"output": [float(arrays[k].sum()) for k in sorted(arrays)] + rows.flatten().tolist()
                            + [type(rows).__name__],
                  "shared": in_store(arrays["transformer.h.0.mlp.c_fc.weight"].unsafe_buffer_pointer())
                            and in_store(one.unsafe_buffer_pointer())}
    """,
    "load_file with the pread backend": """
        import safetensors.numpy, safetensors.torch
        arrays = safetensors.numpy.load_file(directory + "/model.safetensors", backend="pread")
        state = safetensors.torch.load_file(directory + "/model.safetensors", backend="pread")
        try:
            safetensors.numpy.load_file(directory + "/model.safetensors", backend="carrier-pigeon")
            refused = None
        except Exception as exc:  # as safetensors refuses it, served or not
            refused = type(exc).__name__
        result = {"output": [float(arrays[k].astype("float64").sum()) for k in sorted(arrays)] + [refused],
                  "shared": in_store(arrays["transformer.wte.weight"].ctypes.data)
                            and in_store(state["transformer.wte.weight"].data_ptr())}
    """,
    "transformers from_pretrained": """
        from transformers import AutoModelForCausalLM
        from tests.models import output_of
        model = AutoModelForCausalLM.from_pretrained(directory)
        result = {"output": output_of(model, "gpt2").flatten().tolist(),
                  "shared": in_store(model.transformer.h[0].mlp.c_fc.weight.data_ptr()),
                  "tied": model.lm_head.weight is model.transformer.wte.weight}
    """,
    "torch.load of a checkpoint": """
        checkpoint = torch.load(directory + "/bin/pytorch_model.bin", map_location="cpu", mmap=True)
        state, step = checkpoint["model"], checkpoint["step"]
        state["transformer.wte.weight"][0, 0] = 42.0  # in place, as a training script might: a private copy
        result = {"output": [float(state[k].double().sum()) for k in sorted(state)] + [step],
                  "shared": in_store(state["transformer.h.0.mlp.c_fc.weight"].data_ptr()),
                  "tied": state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()}
    """,
    "torch.load of an open file, as Lightning loads": """
        import fsspec
        with fsspec.filesystem("file").open(directory + "/bin/pytorch_model.bin", "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)["model"]
        with open(directory + "/bin/pytorch_model.bin", "rb") as f:
            f.read(1)
            f.seek(0)
            again = torch.load(f)["model"]
        result = {"output": [float(state[k].double().sum()) for k in sorted(state)],
                  "shared": all(in_store(s["transformer.h.0.mlp.c_fc.weight"].data_ptr()) for s in (state, again))}
    """,
    "torch.export.load of a .pt2 archive": """
        program = torch.export.load(directory + "/export/model.pt2")
        with open(directory + "/export/model.pt2", "rb") as f:
            again = torch.export.load(f)
        x = torch.linspace(-1, 1, 4 * 64).reshape(4, 64)
        with torch.no_grad():
            output = program.module()(x)
        result = {"output": output.flatten().tolist(),
                  "shared": in_store(program.state_dict["encode.weight"].data_ptr())
                            and in_store(again.constants["scale"].data_ptr())}
    """,
    "transformers from_pretrained of pytorch_model.bin": """
        from transformers import AutoModelForCausalLM
        from tests.models import output_of
        model = AutoModelForCausalLM.from_pretrained(directory + "/bin-hf")
        result = {"output": output_of(model, "gpt2").flatten().tolist(),
                  "shared": in_store(model.transformer.h[0].mlp.c_fc.weight.data_ptr()),
                  "tied": model.lm_head.weight is model.transformer.wte.weight}
    """,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The model as safetensors, and as torch.save checkpoints: a training one (bin/) and a
    Hugging Face directory of the days before safetensors (bin-hf/); and a torch.export
    archive of a small module (export/)."""
    directory = tmp_path_factory.mktemp("gpt2")
    model, _ = build("gpt2", directory)
    state = model.state_dict()  # lm_head and wte share one storage, as torch.save keeps them
    (directory / "bin").mkdir()
    torch.save({"model": state, "step": 1000}, directory / "bin" / "pytorch_model.bin")
    (directory / "bin-hf").mkdir()
    shutil.copy(directory / "config.json", directory / "bin-hf" / "config.json")
    torch.save(state, directory / "bin-hf" / "pytorch_model.bin")
    export_archive(directory / "export" / "model.pt2")
    return directory


def run_script(body: str, directory, env: dict, transparent: bool) -> tuple[dict, str]:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    command = [sys.executable, "-c", code, str(directory)]
    if transparent:
        command = [sys.executable, "-m", "trims", "run", "--", *command]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_unchanged_scripts_share_the_store_and_give_the_same_outputs(script, model_dir, shared_daemon):
    plain, _ = run_script(SCRIPTS[script], model_dir, shared_daemon.env, transparent=False)
    shared, stderr = run_script(SCRIPTS[script], model_dir, shared_daemon.env, transparent=True)
    again, _ = run_script(SCRIPTS[script], model_dir, shared_daemon.env, transparent=True)
    assert not plain["shared"] and shared["shared"] and again["shared"]
    assert shared["output"] == plain["output"] == again["output"]
    assert shared.get("tied", True) and shared.get("metadata") == plain.get("metadata")
    assert "trims" not in stderr


FILE_OFFSET_LOADS = """
    from torch._subclasses.fake_tensor import FakeTensorMode
    path = directory + "/bin/pytorch_model.bin"
    meta = torch.load(path, map_location=torch.device("meta", 0))["model"]
    with FakeTensorMode():
        fake = torch.load(path)["model"]
    state = torch.load(path)["model"]
    result = {"output": [[k, list(meta[k].shape), meta[k].device.type, list(fake[k].shape)] for k in sorted(meta)],
              "shared": in_store(state["transformer.h.0.mlp.c_fc.weight"].data_ptr())}
"""


def test_loads_that_ask_for_file_offsets_read_the_file_as_torch_would(model_dir, shared_daemon):
    """Onto meta, under a FakeTensorMode or with TORCH_SERIALIZATION_DEBUG=1, torch.load asks
    where each storage lies in the file: those loads read the file; ordinary ones stay shared."""
    plain, _ = run_script(FILE_OFFSET_LOADS, model_dir, shared_daemon.env, transparent=False)
    shared, stderr = run_script(FILE_OFFSET_LOADS, model_dir, shared_daemon.env, transparent=True)
    assert shared["output"] == plain["output"] and {row[2] for row in plain["output"]} == {"meta"}
    assert shared["shared"] and not plain["shared"] and "trims" not in stderr
    debug = {**shared_daemon.env, "TORCH_SERIALIZATION_DEBUG": "1"}
    plain, _ = run_script(SCRIPTS["torch.load of a checkpoint"], model_dir, debug, transparent=False)
    unshared, stderr = run_script(SCRIPTS["torch.load of a checkpoint"], model_dir, debug, transparent=True)
    assert unshared["output"] == plain["output"] and not unshared["shared"] and "trims" not in stderr


UNSHAREABLE_FILE_OBJECTS = """
    import io, os, shutil, tempfile
    path = directory + "/bin/pytorch_model.bin"
    with open(path, "rb") as f:
        memory = torch.load(io.BytesIO(f.read()))["model"]
    scratch = tempfile.mkdtemp()
    shutil.copy(path, scratch + "/model.pt")
    with open(scratch + "/model.pt", "rb") as f:
        os.rename(scratch + "/model.pt", scratch + "/old.pt")  # the name now leads to another file
        shutil.copy(path, scratch + "/model.pt")
        renamed = torch.load(f)["model"]
    result = {"output": [float(s[k].double().sum()) for s in (memory, renamed) for k in sorted(s)],
              "shared": any(in_store(s["transformer.h.0.mlp.c_fc.weight"].data_ptr()) for s in (memory, renamed))}
"""


def test_file_objects_that_are_not_a_checkpoint_on_disk_are_read_as_torch_would(model_dir, shared_daemon):
    plain, _ = run_script(UNSHAREABLE_FILE_OBJECTS, model_dir, shared_daemon.env, transparent=False)
    unshared, stderr = run_script(UNSHAREABLE_FILE_OBJECTS, model_dir, shared_daemon.env, transparent=True)
    assert unshared["output"] == plain["output"] and not unshared["shared"] and "trims" not in stderr


UNSHARED_KINDS = """
    import tempfile, warnings
    scratch = tempfile.mkdtemp(prefix="plain-")
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit is deprecated in PyTorch 2.13, still written
        torch.jit.save(torch.jit.script(module), scratch + "/scripted.pt")
        torch.save(module.state_dict(), scratch + "/legacy.pt", _use_new_zipfile_serialization=False)
        outputs = []
        for _ in range(2):
            scripted = torch.load(scratch + "/scripted.pt", weights_only=False)
            legacy = torch.load(scratch + "/legacy.pt")
            outputs += scripted(torch.ones(1, 4)).flatten().tolist() + [float(v.sum()) for v in legacy.values()]
    import safetensors, safetensors.torch
    for load in (safetensors.torch.load_file, lambda path: safetensors.safe_open(path, "pt"), torch.load):
        try:  # a file that is not there fails as it would without trims, and is not worth a warning
            load(scratch + "/missing.safetensors")
        except Exception as exc:
            outputs.append(type(exc).__name__)
    result = {"output": outputs, "shared": in_store(legacy["weight"].data_ptr())}
"""


def test_files_of_kinds_trims_does_not_share_load_as_ever_without_a_word(model_dir, shared_daemon):
    """A TorchScript archive or a legacy pickle is not shared, and a missing file is not
    there: no trouble to warn of."""
    plain, _ = run_script(UNSHARED_KINDS, model_dir, shared_daemon.env, transparent=False)
    unshared, stderr = run_script(UNSHARED_KINDS, model_dir, shared_daemon.env, transparent=True)
    assert unshared["output"] == plain["output"] and not unshared["shared"] and "trims" not in stderr


def test_a_registered_file_is_read_once_and_found_by_its_content(model_dir, shared_daemon, tmp_path):
    run_script(SCRIPTS["safetensors.torch.load_file"], model_dir, shared_daemon.env, transparent=True)
    client = shared_daemon.client()
    adopted = [m for m in client.list() if m.name.startswith("auto/")]
    assert adopted
    before = client.stats()["pushes"]["total"]
    again = client.adopt(model_dir / "model.safetensors")  # unchanged: looked up, not hashed again
    assert again.new_bytes == 0 and client.stats()["pushes"]["total"] == before
    copy = tmp_path / "copy"  # the same bytes at another path are the same model
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert client.adopt(copy / "model.safetensors").digest == again.digest


@pytest.mark.parametrize("script", ["safetensors.torch.load_file", "transformers from_pretrained", "torch.load of a checkpoint"])
def test_without_a_daemon_scripts_run_as_plain_with_one_warning(script, model_dir, tmp_path):
    env = {**os.environ, "TRIMS_SOCKET": str(tmp_path / "nobody.sock")}
    plain, _ = run_script(SCRIPTS[script], model_dir, env, transparent=False)
    alone, stderr = run_script(SCRIPTS[script], model_dir, env, transparent=True)
    assert alone["output"] == plain["output"] and not alone["shared"]
    warnings = [line for line in stderr.splitlines() if line.startswith("trims:")]
    assert len(warnings) == 1 and "without the shared store" in warnings[0]


def test_the_hook_turns_transparent_mode_on_from_the_environment(model_dir, shared_daemon):
    env = {**shared_daemon.env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    trims_cli = [sys.executable, "-m", "trims", "hook"]
    code = PRELUDE + textwrap.dedent(SCRIPTS["safetensors.torch.load_file"]) + "\nprint(json.dumps(result))\n"
    assert subprocess.run([*trims_cli, "install"], env=env, capture_output=True).returncode == 0
    try:  # the hook lives in this environment's site-packages and acts only on TRIMS_TRANSPARENT=1
        for flag, expected in (("1", True), ("", False)):
            done = subprocess.run([sys.executable, "-c", code, str(model_dir)], env={**env, "TRIMS_TRANSPARENT": flag},
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout.strip().splitlines()[-1])["shared"] is expected
    finally:
        subprocess.run([*trims_cli, "uninstall"], env=env, check=True, capture_output=True)
