"""torch.export archives (.pt2): the program deserialized by PyTorch over the node's copy."""

from __future__ import annotations

import zipfile

import pytest
import torch

import trims.torch
from trims.errors import InvalidModel, UnsupportedFormat

from .models import build, export_archive
from .test_torch import lives_in_store


@pytest.fixture(scope="module")
def archive(shared_daemon, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    model, example = export_archive(path)
    client = shared_daemon.client()
    client.push(path, "export/tied")
    return client, path, model, example


def test_load_exported_runs_the_program_on_the_shared_copy(archive):
    client, path, model, example = archive
    plain = torch.export.load(str(path))
    shared = trims.torch.load_exported("export/tied", client=client)
    assert isinstance(shared, torch.export.ExportedProgram)
    with torch.no_grad():
        expected = model(example)
        assert torch.equal(shared.module()(example), expected) and torch.equal(plain.module()(example), expected)
    assert set(shared.state_dict) == set(plain.state_dict) and set(shared.constants) == set(plain.constants)
    assert "scale" in shared.constants  # a lifted constant: data/constants/, stored as the weights are
    tensors = {**shared.state_dict, **shared.constants}
    assert tensors and all(lives_in_store(t) for t in tensors.values())  # buffers and the constant too
    assert not any(lives_in_store(t) for t in (*plain.state_dict.values(), *plain.constants.values()))


def test_the_module_keeps_ties_and_its_parameters_are_the_shared_tensors(archive):
    client, _, _, example = archive
    module = trims.torch.load_exported("export/tied", client=client).module()
    assert module.encode.weight.data_ptr() == module.decode.weight.data_ptr()
    assert all(lives_in_store(t) for t in module.state_dict().values())
    with torch.no_grad():
        module.encode.weight.add_(1.0)  # in place, in this process only: the mapping is private
    fresh = trims.torch.load_exported("export/tied", client=client).module()
    assert not torch.equal(fresh.encode.weight, module.encode.weight)


def test_an_export_archive_and_a_checkpoint_each_point_at_the_other_loader(archive, shared_daemon, tmp_path):
    client, *_ = archive
    with pytest.raises(InvalidModel, match="load_exported"):
        trims.torch.load_checkpoint("export/tied", client=client)
    model, _ = build("gpt2", tmp_path / "gpt2")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    client.push(tmp_path / "model.pt", "export/not-an-archive")
    with pytest.raises(InvalidModel, match="not a torch.export archive"):
        trims.torch.load_exported("export/not-an-archive", client=client)


def _rewrite(source, target, drop: str = "", add: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        prefix = original.namelist()[0].split("/")[0] + "/"
        for info in original.infolist():
            if not drop or not info.filename[len(prefix):].startswith(drop):
                copy.writestr(info.filename, original.read(info))
        for name, data in (add or {}).items():
            copy.writestr(prefix + name, data)


def test_aoti_packages_and_archives_without_a_program_are_refused_saying_why(archive, tmp_path):
    client, path, *_ = archive
    _rewrite(path, tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsupportedFormat, match="AOTInductor.*aoti_load_package"):
        client.push(tmp_path / "aoti.pt2", "export/aoti")
    _rewrite(path, tmp_path / "empty.pt2", drop="models/")
    with pytest.raises(InvalidModel, match="without a program"):
        client.push(tmp_path / "empty.pt2", "export/empty")


@pytest.mark.parametrize("change, error, message", [
    ({"add": {"data/weights/model.pt": b"PK"}, "drop": "data/weights/"}, UnsupportedFormat, "older layout.*save it again"),
    ({"drop": "archive_format", "add": {"archive_format": b"not-pt2"}}, InvalidModel, "does not say pt2"),
    ({"drop": "data/sample_inputs/"}, InvalidModel, "without data/sample_inputs/model.pt"),
])
def test_archives_torch_export_load_could_not_read_are_refused_at_push(archive, tmp_path, change, error, message):
    client, path, *_ = archive
    _rewrite(path, tmp_path / "odd.pt2", **change)
    with pytest.raises(error, match=message):
        client.push(tmp_path / "odd.pt2", "export/odd")


def test_extra_files_come_back_as_torch_export_load_gives_them(shared_daemon, tmp_path):
    model, example = export_archive(tmp_path / "plain.pt2")
    torch.export.save(torch.export.export(model, (example,)), str(tmp_path / "extra.pt2"),
                      extra_files={"labels.txt": "cat\ndog\n"})
    client = shared_daemon.client()
    client.push(tmp_path / "extra.pt2", "export/extra")
    plain, shared = {"labels.txt": ""}, {"labels.txt": ""}
    torch.export.load(str(tmp_path / "extra.pt2"), extra_files=plain)
    trims.torch.load_exported("export/extra", client=client, extra_files=shared)
    assert shared == plain == {"labels.txt": "cat\ndog\n"}


def test_a_program_the_shared_copy_cannot_satisfy_fails_as_invalid_model(archive, shared_daemon, tmp_path):
    client, path, *_ = archive
    with zipfile.ZipFile(path) as original:
        prefix = original.namelist()[0].split("/")[0] + "/"
        config = original.read(prefix + "data/weights/model_weights_config.json").decode()
    grown = config.replace('{"as_int": 64}', '{"as_int": 6400}', 1)  # a weight larger than its bytes
    _rewrite(path, tmp_path / "grown.pt2", drop="data/weights/model_weights_config.json",
             add={"data/weights/model_weights_config.json": grown.encode()})
    client.push(tmp_path / "grown.pt2", "export/grown")
    with pytest.raises(InvalidModel, match="could not deserialize"):
        trims.torch.load_exported("export/grown", client=client)
