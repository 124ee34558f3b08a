"""The JAX adapter: arrays over the node's copy, a jitted model's outputs unchanged.

JAX runs only in child interpreters: its threads would make every later ``fork`` in the
test process (the forking tests, Ray's workers) liable to deadlock.
"""

from __future__ import annotations

import json
import os
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from .conftest import ROOT, run_python

PRELUDE = """
import gc, json, logging, sys, time
import jax, jax.numpy as jnp, numpy as np
import trims, trims.jax
from trims.errors import ModelMismatch
from tests import mapped

def in_store(array):
    return mapped.in_store(array.unsafe_buffer_pointer())

def apply(params, tokens):
    x = params["embed"]["embedding"][tokens]
    for name in sorted(k for k in params if k.startswith("block_")):
        block = params[name]
        x = x + jax.nn.gelu(x @ block["dense"]["kernel"] + block["dense"]["bias"])
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * block["norm"]["scale"]
    return x

client = trims.connect()
"""


def in_jax(body: str, env: dict) -> dict:
    """Run ``body`` after PRELUDE in a fresh interpreter; it sets ``result``, returned here."""
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    return json.loads(run_jax(code, env).stdout.strip().splitlines()[-1])


def run_jax(code: str, env: dict):
    return run_python(code, {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])})  # tests.mapped


def tiny_mlp_weights(width: int = 64, depth: int = 3) -> dict[str, np.ndarray]:
    """A Flax-style model's parameters, flattened at "." as safetensors files hold them."""
    rng = np.random.default_rng(0)
    weights = {"embed.embedding": rng.standard_normal((32, width), dtype=np.float32)}
    for i in range(depth):
        weights[f"block_{i}.dense.kernel"] = rng.standard_normal((width, width), dtype=np.float32) / width**0.5
        weights[f"block_{i}.dense.bias"] = rng.standard_normal(width, dtype=np.float32) * 0.1
        weights[f"block_{i}.norm.scale"] = np.ones(width, dtype=np.float32)  # equal: the daemon keeps one
    return weights


@pytest.fixture(scope="module")
def mlp_file(shared_daemon, tmp_path_factory):
    path = tmp_path_factory.mktemp("jax") / "mlp.safetensors"
    save_file(tiny_mlp_weights(), str(path))
    shared_daemon.client().push(path, "jax/mlp")
    return path


def test_load_params_gives_a_jitted_model_its_outputs_from_the_shared_copy(mlp_file, shared_daemon):
    result = in_jax(f"""
        from safetensors.flax import load_file
        params = trims.jax.load_params("jax/mlp")
        plain = load_file({str(mlp_file)!r})
        original = {{}}
        for key, value in plain.items():
            *parents, leaf = key.split(".")
            node = original
            for part in parents:
                node = node.setdefault(part, {{}})
            node[leaf] = value
        tokens = jnp.arange(8) % 32
        result = {{"same_tree": jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(original),
                   "equal": bool(jnp.array_equal(jax.jit(apply)(params, tokens), jax.jit(apply)(original, tokens))),
                   "shared": all(in_store(leaf) for leaf in jax.tree_util.tree_leaves(params)),
                   "plain_shared": any(in_store(leaf) for leaf in plain.values())}}
    """, shared_daemon.env)
    assert result == {"same_tree": True, "equal": True, "shared": True, "plain_shared": False}


def test_the_flat_state_dict_is_each_tensor_by_name_in_the_store(mlp_file, shared_daemon):
    expected = tiny_mlp_weights()
    result = in_jax("""
        weights = trims.jax.load_state_dict("jax/mlp")
        result = {"sums": {k: float(jnp.sum(v)) for k, v in weights.items()},
                  "shared": all(in_store(v) for v in weights.values()),
                  # equal tensors are stored once, and immutable arrays need no copy of their own
                  "one_scale": weights["block_0.norm.scale"].unsafe_buffer_pointer()
                               == weights["block_1.norm.scale"].unsafe_buffer_pointer()}
    """, shared_daemon.env)
    assert result["sums"] == pytest.approx({k: float(v.sum()) for k, v in expected.items()}, rel=1e-5)
    assert result["shared"] and result["one_scale"]


def test_jax_arrays_hold_the_lease_until_the_last_goes(mlp_file, shared_daemon):
    result = in_jax("""
        def leases():  # once this process's releases have gone out
            gc.collect()
            counts = [client.stats()["leases"]]
            while len(counts) < 3 or len(set(counts[-3:])) > 1:
                time.sleep(0.05)
                counts.append(client.stats()["leases"])
            return counts[-1]
        before = leases()
        weights = trims.jax.load_state_dict("jax/mlp", client=client)
        kernel = weights["block_0.dense.kernel"]
        del weights
        held = leases()
        total = float(jnp.sum(kernel))
        del kernel
        result = {"held": held - before, "after": leases() - before, "total": total}
    """, shared_daemon.env)
    assert result["held"] == 1 and result["after"] == 0
    assert result["total"] == pytest.approx(float(tiny_mlp_weights()["block_0.dense.kernel"].sum()), rel=1e-5)


def test_bf16_and_fp8_are_shared_as_they_are_and_64_bit_types_are_narrowed_copies_said_so(shared_daemon, tmp_path):
    tensors = {"bf16": np.arange(64, dtype=np.float32).astype(ml_dtypes.bfloat16),
               "fp8": np.linspace(-2, 2, 64, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
               "f64": np.linspace(0, 1, 64), "i64": np.arange(64, dtype=np.int64)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    shared_daemon.client().push(tmp_path / "mixed.safetensors", "jax/mixed")
    result = in_jax("""
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
        arrays = trims.jax.load_state_dict("jax/mixed")
        result = {k: {"dtype": str(a.dtype), "shared": in_store(a), "values": np.asarray(a).astype("float64").tolist()}
                  for k, a in arrays.items()}
    """, shared_daemon.env)
    for key in ("bf16", "fp8"):
        assert result[key]["dtype"] == str(tensors[key].dtype) and result[key]["shared"]
        assert result[key]["values"] == tensors[key].astype(np.float64).tolist()
    assert {result[k]["dtype"] for k in ("f64", "i64")} == {"float32", "int32"}  # jax_enable_x64 is off
    assert not result["f64"]["shared"] and not result["i64"]["shared"]
    assert np.allclose(result["f64"]["values"], tensors["f64"])


def test_the_copies_are_logged_with_their_reason(shared_daemon, tmp_path):
    save_file({"f64": np.linspace(0, 1, 64), "f32": np.ones(64, dtype=np.float32)}, str(tmp_path / "x64.safetensors"))
    shared_daemon.client().push(tmp_path / "x64.safetensors", "jax/x64")
    code = PRELUDE + textwrap.dedent("""
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
        trims.jax.load_state_dict("jax/x64")
    """)
    out = run_jax(code, shared_daemon.env).stdout
    assert "1 of 2 tensors (512 bytes, e.g. float64 as float32) were copied" in out and "jax_enable_x64" in out


def test_transparent_safe_open_says_once_that_it_narrowed_a_tensor(shared_daemon, tmp_path):
    """safe_open(framework="flax") places each tensor when asked: the copy is said at the first."""
    save_file({"f64": np.linspace(0, 1, 64), "i64": np.arange(8), "f32": np.ones(64, dtype=np.float32)},
              str(tmp_path / "lazy.safetensors"))
    code = PRELUDE + textwrap.dedent(f"""
        import trims.transparent
        trims.transparent.install()
        from safetensors import safe_open
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
        with safe_open({str(tmp_path / "lazy.safetensors")!r}, framework="flax") as f:
            print("F32", in_store(f.get_tensor("f32")))
            arrays = [f.get_tensor(k) for k in ("f64", "i64", "f64")]
            print("DTYPES", sorted({{str(a.dtype) for a in arrays}}))
    """)
    out = run_jax(code, shared_daemon.env).stdout
    assert "F32 True" in out and "DTYPES ['float32', 'int32']" in out
    said = [line for line in out.splitlines() if line.startswith("LOG") and "copied into this process" in line]
    assert len(said) == 1 and "float64 as float32" in said[0] and "jax_enable_x64" in said[0], out


def test_names_that_do_not_nest_are_refused_pointing_at_the_flat_names(shared_daemon, tmp_path):
    save_file({"encoder": np.ones(4, dtype=np.float32), "encoder.bias": np.zeros(4, dtype=np.float32)},
              str(tmp_path / "odd.safetensors"))
    shared_daemon.client().push(tmp_path / "odd.safetensors", "jax/odd")
    result = in_jax("""
        try:
            trims.jax.load_params("jax/odd")
            refused = None
        except ModelMismatch as exc:
            refused = str(exc)
        result = {"refused": refused, "flat": sorted(trims.jax.load_state_dict("jax/odd")),
                  "other_sep": sorted(trims.jax.load_params("jax/odd", sep="/"))}
    """, shared_daemon.env)
    assert "'encoder'" in result["refused"] and "load_state_dict" in result["refused"]
    assert result["flat"] == result["other_sep"] == ["encoder", "encoder.bias"]


def test_a_process_holds_no_copy_of_its_own(shared_daemon, tmp_path):
    rng = np.random.default_rng(0)
    save_file({f"w{i}": rng.standard_normal((2048, 2048), dtype=np.float32) for i in range(4)},  # 64 MiB
              str(tmp_path / "wide.safetensors"))
    shared_daemon.client().push(tmp_path / "wide.safetensors", "jax/wide")
    result = in_jax("""
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("Pss_Anon:")) * 1024
        float(jnp.sum(jnp.zeros((2048, 2048))))  # JAX's own start: the runtime, the compiled reduction
        before = anon()
        weights = trims.jax.load_state_dict("jax/wide")
        total = sum(float(jnp.sum(w)) for w in weights.values())  # every page read
        result = {"growth": anon() - before}
    """, shared_daemon.env)
    assert result["growth"] < 64 * 2**20 / 8  # private memory grew by far less than the 64 MiB of weights


def test_a_cpu_device_or_a_sharding_over_cpu_devices_shares_and_a_tree_of_shardings_places_each(mlp_file,
                                                                                                shared_daemon):
    env = {**shared_daemon.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = in_jax("""
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        said = []
        logging.getLogger("trims.jax").addHandler(type("Said", (logging.Handler,), {"emit": lambda _, r: said.append(r)})())
        logging.getLogger("trims.jax").setLevel(logging.INFO)
        cpu = jax.devices("cpu")
        on_second = trims.jax.load_state_dict("jax/mlp", device=cpu[1])
        mesh = Mesh(np.array(cpu), ("x",))
        rows = NamedSharding(mesh, PartitionSpec("x"))
        split = trims.jax.load_state_dict("jax/mlp", device=rows)
        shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()),
                                           trims.jax.load_params("jax/mlp"))
        shardings["embed"]["embedding"] = rows
        params = trims.jax.load_params("jax/mlp", device=shardings)
        kernel = split["block_0.dense.kernel"]
        result = {"second": {str(d) for a in on_second.values() for d in a.devices()} == {str(cpu[1])},
                  "second_shared": all(in_store(a) for a in on_second.values()),
                  "split": len(kernel.addressable_shards) == 2 and kernel.sharding == rows,
                  "split_shared": all(in_store(shard.data) for shard in kernel.addressable_shards),
                  "split_equal": np.array_equal(np.asarray(kernel), np.asarray(on_second["block_0.dense.kernel"])),
                  "placed": params["embed"]["embedding"].sharding == rows
                            and params["block_0"]["dense"]["kernel"].sharding.spec == PartitionSpec(),
                  "copies_said": len(said)}
    """, env)
    assert result == {"second": True, "second_shared": True, "split": True, "split_shared": True, "split_equal": True,
                      "placed": True, "copies_said": 0}
