"""Hostile safetensors headers, checked without a daemon."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from trims.errors import InvalidModel
from trims.safetensors_format import MAX_HEADER_BYTES, read_header
from trims.sources import FileSource

from .models import raw_safetensors

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def header_of(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(FileSource(path.name, fd))
    finally:
        os.close(fd)


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16), "s": torch.tensor(3), "e": torch.zeros(0, 5)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = header_of(tmp_path / "m.safetensors")
    by_name = {t.name: t for t in header.tensors}
    assert header.metadata == {"format": "pt"}
    assert by_name["a"].dtype == "F32" and by_name["a"].shape == (2, 3) and by_name["a"].nbytes == 24
    assert by_name["b"].dtype == "BF16" and by_name["b"].nbytes == 8
    assert by_name["s"].shape == () and by_name["s"].nbytes == 8
    assert by_name["e"].shape == (0, 5) and by_name["e"].nbytes == 0


@pytest.mark.parametrize(
    "header, data, header_len, fragment",
    [
        (b"", b"", MAX_HEADER_BYTES + 1, "exceeds"),
        (b"{}", b"", 2**63, "exceeds"),
        ({"a": F32}, b"", 10_000, "truncated"),
        ({"a": F32}, b"\0" * 4, None, "outside"),
        ({"a": {**F32, "data_offsets": [4, 2]}}, b"\0" * 8, None, "outside"),
        ({"a": {**F32, "data_offsets": [-1, 7]}}, b"\0" * 8, None, "data_offsets"),
        ({"a": {**F32, "data_offsets": [0]}}, b"\0" * 8, None, "data_offsets"),
        ({"a": {**F32, "data_offsets": [0.0, 8]}}, b"\0" * 8, None, "data_offsets"),
        ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20, None, "4 bytes before tensor 'b'"),
        ({"a": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, None, "before tensor 'a'"),
        ({"a": F32}, b"\0" * 12, None, "4 bytes after the last tensor"),
        ({"a": {**F32, "dtype": "F128"}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {**F32, "dtype": None}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {**F32, "shape": [3]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": {**F32, "shape": [-2]}}, b"\0" * 8, None, "shape"),
        ({"a": {**F32, "shape": [True, 2]}}, b"\0" * 8, None, "shape"),
        ({"a": {**F32, "shape": "2"}}, b"\0" * 8, None, "shape"),
        ({"a": {**F32, "shape": [1] * 65}}, b"\0" * 8, None, "shape"),
        ({"a": {**F32, "shape": [2**62, 2**62]}}, b"\0" * 8, None, "needs"),
        ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"\0", None, "needs None bytes"),
        ({"a": [1, 2]}, b"", None, "not an object"),
        ({"": F32}, b"\0" * 8, None, "name"),
        ({"x" * 2000: F32}, b"\0" * 8, None, "name"),
        ({"__metadata__": {"k": 1}, "a": F32}, b"\0" * 8, None, "__metadata__"),
        ({"__metadata__": [], "a": F32}, b"\0" * 8, None, "__metadata__"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
         b"\0" * 8, None, "twice"),
        (b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, None, "twice"),
        (b"[" * 50_000 + b"]" * 50_000, b"", None, "nested too deeply"),
        (b'{"a": "\xff\xfe"}', b"", None, "UTF-8"),
        (b"not json at all", b"", None, "not valid JSON"),
        (b'"just a string"', b"", None, "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}', b"\0" * 8, None, "not valid JSON"),
    ],
)
def test_hostile_headers_are_refused_with_a_clear_error(tmp_path, header, data, header_len, fragment):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(InvalidModel, match=fragment) as info:
        header_of(path)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03", struct.pack("<Q", 100)])
def test_truncated_files_are_refused(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidModel, match="truncated"):
        header_of(path)


def test_sub_byte_types_count_bits(tmp_path):
    path = raw_safetensors(tmp_path / "fp4.safetensors", {"a": {"dtype": "F4", "shape": [2, 6], "data_offsets": [0, 6]}}, b"\0" * 6)
    (spec,) = header_of(path).tensors
    assert spec.nbytes == 6
