"""`xbitc export ART --webgpu DIR` (xbitc/webgpu/export.py): the bundle's files, its arrays against a fresh
`gpu_matrix`, its check data against an independent oracle, and the bundle run through wgpu-py (Mesa's lavapipe
here; skipped, saying why, where no adapter exists) by a host that knows only what model.json says: the page's job
(examples/webgpu/main.js) done in Python, so the bundle is shown to be self-describing. Bad input: one line, exit 2.

Tolerances. check.json's y is x W^T in float64 from the dequantized matrix; the oracle here (rowlane
`reference_rows` on the unpacked records) sums the same float64 products in another order: 1e-12 of the sum of
magnitudes. The kernels' float32 y: the rigorous bound of tests/test_gpu_kernels.py, which check.json carries
(roundings * 2^-24 * absum per output). Dequantized rows: bit for bit (s * (q - z) is exact in float32).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from xbitc.artifact import load_graph
from xbitc.quant.packed import PackedMatrix
from xbitc.webgpu.export import ALIGN, ARRAYS, FORMAT, VERSION, bundle_kernels, export_webgpu
from xbitc.webgpu.weights import gpu_matrix

sys.path.insert(0, str(Path(__file__).parent))

CHECKED = "down.0.weight"  # permuted, three depths, dropped columns (bpw 3.5 below)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from test_bad_input import quiet, tiny_loaded

    from xbitc.driver import compile_model

    out = tmp_path_factory.mktemp("webgpu-export") / "tiny.xbitc"
    compile_model(tiny_loaded(), out, quiet(bpw=3.5))
    return out


@pytest.fixture(scope="module")
def bundle(artifact):
    out = artifact.parent / "bundle"
    export_webgpu(artifact, out, check=CHECKED)
    return out


def packed_params(artifact: Path) -> dict[str, PackedMatrix]:
    graph, _ = load_graph(artifact)
    return {n: v for n, v in graph.params.items() if isinstance(v, PackedMatrix)}


def array(bundle: Path, matrix: dict, part: str) -> np.ndarray:
    r = matrix["arrays"][part]
    return np.frombuffer((bundle / "weights.bin").read_bytes()[r["offset"]:r["offset"] + r["bytes"]], "<u4")


# ------------------------------------------------------------------------------------------------ the files


def test_bundle_holds_the_kernels_and_every_packed_matrix_in_its_gpu_layout(artifact, bundle):
    from xbitc.backends.gpu.render import WGSL

    assert sorted(p.name for p in bundle.iterdir()) == ["check.json", "kernels.wgsl", "model.json", "weights.bin"]
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".bundle.")]  # no temporary left
    model = json.loads((bundle / "model.json").read_text())
    assert (model["format"], model["version"]) == (FORMAT, VERSION)
    wgsl = (bundle / "kernels.wgsl").read_bytes()
    for role, k in bundle_kernels().items():
        info = model["kernels"][role]
        assert {key: info[key] for key in k.interface()} == k.interface()
        src = info["source"]
        assert wgsl[src["offset"]:src["offset"] + src["bytes"]].decode() == WGSL().render(k)
    weights = (bundle / "weights.bin").read_bytes()
    assert len(weights) == model["weights_bytes"] and len(weights) % ALIGN == 0
    params = packed_params(artifact)
    assert [m["name"] for m in model["matrices"]] == sorted(params)
    spans = []
    for m in model["matrices"]:
        fresh = gpu_matrix(params[m["name"]])
        assert m["shape"] == list(params[m["name"]].shape) == [fresh.rows, fresh.inp]
        assert (m["npieces"], m["stride"], m["xcols"], m["row_blocks"]) == \
            (fresh.npieces, fresh.stride, fresh.xcols, fresh.row_blocks)
        for part in ARRAYS:
            r = m["arrays"][part]
            assert r["offset"] % ALIGN == 0
            spans.append((r["offset"], r["offset"] + r["bytes"]))
            assert np.array_equal(array(bundle, m, part), getattr(fresh, part).ravel()), (m["name"], part)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= len(weights)  # disjoint


def test_dispatch_rules_of_the_docstring_give_gpu_matrix_args(bundle, artifact):
    """What a host derives from model.json (parameters by name, workgroup counts) is GpuMatrix's own *_args."""
    model = json.loads((bundle / "model.json").read_text())
    params = packed_params(artifact)
    for m in model["matrices"]:
        g = gpu_matrix(params[m["name"]])
        for tokens in (1, 3, 4, 9):
            for role in ("gemv", "gemm"):
                tile = model["kernels"][role]["tile"]
                assert Host.call_args(model, "gather", m, tokens, tile) == g.gather_args(tokens, tile)
                assert Host.call_args(model, role, m, tokens, tile) == g.product_args(tokens, tile)
            assert Host.call_args(model, "dequant", m, tokens, 1) == g.dequant_args(tokens)


def test_check_data_is_the_matrix_product(bundle, artifact):
    from xbitc.backends.cpu.rows import rowlane_records
    from xbitc.backends.llvm.rowlane import reference_rows

    check = json.loads((bundle / "check.json").read_text())
    pm = packed_params(artifact)[CHECKED]
    rows, inp = pm.shape
    assert check["matrix"] == CHECKED and check["tokens"] >= 2
    x = np.asarray(check["x"], np.float32).reshape(check["tokens"], inp)
    assert np.array_equal(x, np.random.default_rng(check["seed"]).standard_normal(x.shape).astype(np.float32))
    records = rowlane_records([ps for ps in pm.segments if ps.seg.bits], rows)
    xs = x.astype(np.float64)[:, np.asarray(pm.perm, np.int64)] if pm.perm is not None else x.astype(np.float64)
    want = reference_rows([r[:4] for r in records], xs, rows)
    y, absum = (np.asarray(check[k]).reshape(want.shape) for k in ("y", "absum"))
    assert np.all(np.abs(y - want) <= 1e-12 * absum)
    assert np.all(np.abs(y) <= absum) and absum.max() > 0
    assert check["roundings"] == 160 + gpu_matrix(pm).npieces and check["unit_roundoff"] == 2.0**-24


# ------------------------------------------------------------------------------------------------ run on WebGPU


class Host:
    """Runs a bundle's kernels on a WebGPU device from model.json, kernels.wgsl and weights.bin alone."""

    PACK = {"u32": "<I", "i32": "<i", "f32": "<f"}

    def __init__(self, folder: Path):
        from xbitc.backends.gpu.webgpu import NoAdapter, adapter

        try:
            self.device = adapter().request_device_sync()
        except NoAdapter as err:
            pytest.skip(str(err))
        import wgpu

        self.wgpu, self.folder = wgpu, folder
        self.model = json.loads((folder / "model.json").read_text())
        self.wgsl = (folder / "kernels.wgsl").read_bytes()
        self.weights = (folder / "weights.bin").read_bytes()
        self.pipes = {role: self.pipeline(info) for role, info in self.model["kernels"].items()}

    def pipeline(self, info: dict):
        w = self.wgpu
        src = info["source"]
        module = self.device.create_shader_module(code=self.wgsl[src["offset"]:src["offset"] + src["bytes"]].decode())
        kinds = [w.BufferBindingType.storage if b["write"] else w.BufferBindingType.read_only_storage
                 for b in info["buffers"]] + ([w.BufferBindingType.uniform] if info["params"] else [])
        group = self.device.create_bind_group_layout(entries=[
            {"binding": i, "visibility": w.ShaderStage.COMPUTE, "buffer": {"type": t}} for i, t in enumerate(kinds)])
        layout = self.device.create_pipeline_layout(bind_group_layouts=[group])
        return self.device.create_compute_pipeline(layout=layout, compute={"module": module,
                                                                          "entry_point": info["name"]}), group

    @staticmethod
    def call_args(model: dict, role: str, m: dict, tokens: int, tile: int) -> tuple[dict, tuple]:
        """(parameters, workgroups) of a call: the rules of xbitc/webgpu/export.py's docstring."""
        info = model["kernels"][role]
        params = {p["name"]: tokens if p["name"] == "tokens" else m[p["name"]] for p in info["params"]}
        wg, tiles = info["workgroup"][0], -(-tokens // tile)
        groups = {"gather": (-(-m["xcols"] // wg), tiles * tile), "dequant": (-(-m["inp"] // wg), tokens)}
        return params, groups.get(role, (m["row_blocks"], tiles))

    def storage(self, data: bytes | int):
        use = self.wgpu.BufferUsage
        usage = use.STORAGE | use.COPY_SRC | use.COPY_DST
        if isinstance(data, int):
            return self.device.create_buffer(size=max(16, -(-data // 16) * 16), usage=usage)
        return self.device.create_buffer_with_data(data=data + bytes(-len(data) % 16 or (16 if not data else 0)),
                                                   usage=usage)

    def run(self, name: str, calls: list[tuple[str, dict]], tokens: int, tile: int) -> None:
        """calls: (role, buffers by binding name other than the matrix's arrays), in order, one submission."""
        m = next(m for m in self.model["matrices"] if m["name"] == name)
        arrays = {part: self.storage(self.weights[r["offset"]:r["offset"] + r["bytes"]])
                  for part, r in m["arrays"].items()}
        enc = self.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        for role, bufs in calls:
            info = self.model["kernels"][role]
            params, groups = self.call_args(self.model, role, m, tokens, tile)
            entries = [{"binding": i, "resource": {"buffer": arrays[self.model["bind"][b["name"]]]
                                                   if b["name"] in self.model["bind"] else bufs[b["name"]]}}
                       for i, b in enumerate(info["buffers"])]
            if info["params"]:
                raw = bytearray(info["params_bytes"])
                for p in info["params"]:
                    struct.pack_into(self.PACK[p["type"]], raw, p["offset"], params[p["name"]])
                ub = self.device.create_buffer_with_data(data=bytes(raw), usage=self.wgpu.BufferUsage.UNIFORM)
                entries.append({"binding": len(entries), "resource": {"buffer": ub}})
            pipe, group = self.pipes[role]
            cp.set_pipeline(pipe)
            cp.set_bind_group(0, self.device.create_bind_group(layout=group, entries=entries))
            cp.dispatch_workgroups(*groups, 1)
        cp.end()
        self.device.queue.submit([enc.finish()])

    def product(self, name: str, role: str, x: np.ndarray) -> np.ndarray:
        m = next(m for m in self.model["matrices"] if m["name"] == name)
        tokens, tile = x.shape[0], self.model["kernels"][role]["tile"]
        xp = self.storage(4 * -(-tokens // tile) * tile * m["xcols"])
        y = self.storage(np.full(tokens * m["rows"], np.nan, np.float32).tobytes())
        self.run(name, [("gather", {"x": self.storage(x.astype(np.float32).tobytes()), "xp": xp}),
                        (role, {"xp": xp, "y": y})], tokens, tile)
        return self.read(y, tokens * m["rows"]).reshape(tokens, m["rows"])

    def dequant(self, name: str, ids: np.ndarray) -> np.ndarray:
        m = next(m for m in self.model["matrices"] if m["name"] == name)
        out = self.storage(np.full(len(ids) * m["inp"], np.nan, np.float32).tobytes())
        self.run(name, [("dequant", {"ids": self.storage(ids.astype(np.uint32).tobytes()), "out": out})],
                 len(ids), 1)
        return self.read(out, len(ids) * m["inp"]).reshape(len(ids), m["inp"])

    def read(self, buf, count: int) -> np.ndarray:
        return np.frombuffer(self.device.queue.read_buffer(buf), np.float32)[:count]


@pytest.fixture(scope="module")
def host(bundle):
    return Host(bundle)


@pytest.mark.parametrize("role", ["gemv", "gemm"])
def test_the_bundle_alone_reproduces_check_y_on_webgpu(host, bundle, role):
    check = json.loads((bundle / "check.json").read_text())
    m = next(m for m in host.model["matrices"] if m["name"] == check["matrix"])
    x = np.asarray(check["x"], np.float32).reshape(check["tokens"], m["inp"])
    want = np.asarray(check["y"]).reshape(check["tokens"], m["rows"])
    tol = check["roundings"] * check["unit_roundoff"] * np.asarray(check["absum"]).reshape(want.shape) + 1e-30
    err = np.abs(host.product(check["matrix"], role, x) - want)
    assert (err <= tol).all(), f"{role}: worst error {err.max():.3g}, bound there {tol[err > tol].min():.3g}"
    assert err.max() > 0 or np.abs(want).max() == 0  # float32 arithmetic ran (a float64 copy would not round)


def test_the_bundle_alone_dequantizes_every_matrix_bit_for_bit(host, artifact):
    for name, pm in packed_params(artifact).items():
        rows = pm.shape[0]
        ids = np.array([0, rows - 1, rows // 2, rows + 3])  # the last one is outside the table: zeros
        got = host.dequant(name, ids)
        want = pm.dequantize().numpy()
        assert np.array_equal(got[:3], want[ids[:3]]), name
        assert not got[3].any(), name


# ------------------------------------------------------------------------------------------------ bad input


def test_cli_writes_the_bundle_and_says_what(artifact, tmp_path, capsys):
    from xbitc.cli import main

    out = tmp_path / "web"
    out.mkdir()  # an empty folder is fine
    assert main(["export", str(artifact), "--webgpu", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: kernels.wgsl, model.json (5 packed matrices), weights.bin") and \
        "check.json" not in said
    assert sorted(p.name for p in out.iterdir()) == ["kernels.wgsl", "model.json", "weights.bin"]


@pytest.mark.parametrize("case", ["missing", "not-empty", "file", "unknown-check", "check-for-c-lib", "act",
                                  "float-only"])
def test_bad_input_is_one_line_and_writes_nothing(artifact, tmp_path, capsys, case):
    from test_bad_input import one_error_line

    from xbitc.cli import main

    out = tmp_path / "web"
    art, extra = str(artifact), []
    if case == "missing":
        art = str(tmp_path / "absent.xbitc")
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "file":
        out.write_text("mine")
    elif case == "unknown-check":
        extra = ["--check", "no.such.weight"]
    elif case == "act":
        extra = ["--act", "q8"]
    elif case == "float-only":
        from test_bad_input import quiet, tiny_loaded

        from xbitc.driver import compile_model

        art = str(tmp_path / "float.xbitc")
        compile_model(tiny_loaded(), Path(art), quiet(passes="canonicalize"))  # no quantize, no pack
    argv = ["export", art, "--c-lib" if case == "check-for-c-lib" else "--webgpu", str(out), *extra]
    if case == "check-for-c-lib":
        argv += ["--check", CHECKED]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    expect = {"missing": "absent.xbitc", "not-empty": "exists and is not empty", "file": "is a file",
              "unknown-check": "no packed matrix of that name; give one of", "check-for-c-lib": "--check applies to "
              "--webgpu", "act": "--act applies to --c-lib only",
              "float-only": "float.xbitc holds no packed matrices"}[case]
    assert expect in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_no_folder(artifact, tmp_path, monkeypatch):
    import xbitc.webgpu.export as export

    def broken(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "check_data", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_webgpu(artifact, tmp_path / "web", check=CHECKED)
    assert list(tmp_path.iterdir()) == []
