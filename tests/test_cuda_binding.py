"""trims' ctypes binding of the CUDA driver, run against a stand-in libcuda.so.1 (C, over host
memory: tests/fake_libcuda.c), so that the GPU path is exercised on every machine where ctypes
meets the C ABI: symbol names, arguments, struct layouts, descriptors crossing processes, the
read-only mapping, and which context each call leaves current. The real driver's behaviour
is for tests/test_gpu.py on a GPU machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import DaemonProcess, run_python

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory) -> str:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in libcuda with")
    directory = tmp_path_factory.mktemp("fake-libcuda")
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"),
                    os.path.join(HERE, "fake_libcuda.c")], check=True, capture_output=True, timeout=120)
    return str(directory)


def _env(fake_libcuda: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(base or os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [fake_libcuda, env.get("LD_LIBRARY_PATH")]))
    return env


PRELUDE = """
    import ctypes, gc
    from trims import cuda_driver
    from trims.cuda_driver import PROT_READ, PROT_READWRITE
    fake = ctypes.CDLL("libcuda.so.1")
    driver = cuda_driver.driver()
    def set_current(device):
        context = ctypes.c_void_p()
        assert fake.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0
        assert fake.cuCtxSetCurrent(context) == 0
"""


def _script(body: str) -> str:
    return textwrap.dedent(PRELUDE) + textwrap.dedent(body)


def test_the_calls_a_client_makes_leave_its_current_context_alone(fake_libcuda):
    # A process working on cuda:1 (PyTorch's current device is its current context's) that
    # maps a model on cuda:0 must still be on cuda:1 afterwards, on every thread.
    run_python(_script("""
    allocation = driver.allocate(0, 3 << 20)
    for before in (1, None):
        if before is not None:
            set_current(before)
        else:
            fake.cuCtxSetCurrent(None)
        expected = -1 if before is None else before
        handle = driver.import_fd(0, allocation.fd)
        assert fake.fakecuda_current_device() == expected, "import_fd"
        mapping = driver.map(0, handle, allocation.size, PROT_READ)
        assert fake.fakecuda_current_device() == expected, "map"
        driver.synchronize_device(0)
        assert fake.fakecuda_current_device() == expected, "synchronize_device"
        driver.unmap(mapping)
        driver.release(0, handle)
        assert fake.fakecuda_current_device() == expected, "unmap and release"
    driver.release(0, allocation.handle)
    assert fake.fakecuda_live_handles() == 0
    """), _env(fake_libcuda))


READER = """
import ctypes, sys
from trims import cuda_driver
driver = cuda_driver.driver()
fd, size, n = (int(a) for a in sys.argv[1:])
handle = driver.import_fd(1, fd)
mapping = driver.map(1, handle, size, cuda_driver.PROT_READ)
out = ctypes.create_string_buffer(n)
with driver.current(1):
    driver.copy_to_host(ctypes.addressof(out), mapping.pointer, n)
sys.stdout.buffer.write(out.raw)
sys.stdout.flush()
ctypes.memmove(mapping.pointer, b"x", 1)  # a write to the read-only mapping: must fault
"""


def test_an_allocation_filled_here_reads_back_through_another_process_read_only(fake_libcuda, tmp_path):
    (tmp_path / "reader.py").write_text(READER)
    run_python(_script(f"""
    import os, subprocess, sys
    data = os.urandom(5 << 20)
    allocation = driver.allocate(1, len(data))
    assert allocation.size == 6 << 20  # whole granules
    mapping = driver.map(1, allocation.handle, allocation.size, PROT_READWRITE)
    stream, event = driver.stream(1), driver.event(1)
    staging = driver.pinned(1, len(data))
    ctypes.memmove(staging, data, len(data))
    with driver.current(1):
        driver.copy_to_device(mapping.pointer, ctypes.addressof(staging), len(data), stream)
        driver.record(event, stream)
        driver.wait(event)
        driver.synchronize(stream)
    assert fake.fakecuda_current_device() == -1
    done = subprocess.run([sys.executable, {str(tmp_path / "reader.py")!r}, str(allocation.fd), str(allocation.size),
                           str(len(data))], pass_fds=[allocation.fd], capture_output=True, timeout=60)
    assert done.stdout == data, done.stderr.decode()[-2000:]
    assert done.returncode == -11, (done.returncode, done.stderr.decode()[-2000:])  # SIGSEGV
    with driver.current(1):
        driver.destroy_event(event)
        driver.destroy_stream(stream)
    driver.free_pinned(staging)
    driver.unmap(mapping)
    driver.release(1, allocation.handle)
    os.close(allocation.fd)
    assert fake.fakecuda_live_handles() == 0
    """), _env(fake_libcuda))


def test_a_model_opened_on_the_stand_in_gpu_maps_the_daemons_copy_read_only(fake_libcuda, tmp_path):
    weights = {"a": np.arange(300_000, dtype=np.float32), "b": np.full((64, 64), 7, dtype=np.int16)}
    save_file(weights, tmp_path / "m.safetensors")
    # The daemon's GPU tier runs over the stand-in driver too.
    daemon = DaemonProcess(tmp_path / "d", extra=("--gpu-memory", "64M"), env=_env(fake_libcuda)).start()
    try:
        daemon.client().push(tmp_path / "m.safetensors", "g/m:1")
        env = _env(fake_libcuda, daemon.env)
        code = _script(f"""
        import numpy as np, trims
        from safetensors.numpy import load_file
        expected = load_file({str(tmp_path / "m.safetensors")!r})
        client = trims.connect()
        view = client.open("g/m:1", device=0)
        assert fake.fakecuda_current_device() == -1  # the open left this thread as it found it
        assert all(segment.read_only for segment in view.segments)
        for name, entry in view.index.items():
            out = ctypes.create_string_buffer(entry.nbytes)
            with driver.current(0):
                driver.copy_to_host(ctypes.addressof(out), view.segments[entry.segment].pointer + entry.offset,
                                    entry.nbytes)
            assert out.raw == expected[name].tobytes(), name
        stats = client.stats()["tiers"]["gpu:0"]
        assert stats["used_bytes"] >= 2 << 20 and stats["read_only_mapping"] and stats["sharing"] == "vmm-posix-fd"
        view.close()
        gc.collect()
        assert fake.fakecuda_live_handles() == 0  # the import and the mapping went with the view
        print("ok")
        """)
        assert run_python(code, env).stdout.strip().endswith("ok")
        writer = _script("""
        import trims
        view = trims.connect().open("g/m:1", device=0)
        ctypes.memmove(view.segments[0].pointer, b"x", 1)
        """)
        done = run_python(writer, env, check=False)
        assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]
        assert run_python(code, env).stdout.strip().endswith("ok")  # the daemon's copy is as it was
    finally:
        daemon.kill()
