"""Pass, PassContext and PassManager.

A pass is a frozen dataclass: its options are its fields, `requires`/`provides` name facts about the graph
("calibrated", "quantized", "packed"), and `run(graph, ctx)` returns the new graph. The manager checks facts,
runs, verifies, optionally dumps the IR, and on failure names the pass and the ones that ran before it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from xbitc import heap
from xbitc.ir.graph import Graph
from xbitc.ir.printer import print_graph
from xbitc.ir.verify import verify


class PassError(RuntimeError):
    pass


MIN_BPW, MAX_BPW = 0.5, 32.0  # the whole-model bits per weight a size target may ask for


@dataclass(frozen=True)
class Range:
    """The values a numeric pass option accepts: lo <= v <= hi (either bound may be None); `above`: v > above."""

    lo: float | None = None
    hi: float | None = None
    above: float | None = None

    def admits(self, value: Any) -> bool:
        if value is None:  # an optional option left unset
            return True
        return ((self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
                and (self.above is None or value > self.above))

    def __str__(self) -> str:
        if self.above is not None:
            low = f"> {self.above:g}"
            return low if self.hi is None else f"{low} and <= {self.hi:g}"
        if self.lo is not None and self.hi is not None:
            return f"{self.lo:g}..{self.hi:g}"
        return f">= {self.lo:g}" if self.lo is not None else f"<= {self.hi:g}"


def option(default: Any, lo: float | None = None, hi: float | None = None, *, above: float | None = None) -> Any:
    """A pass option (dataclass field) with a declared range, checked when the pass is built:
    `bits: int | None = option(None, 1, 8)`."""
    return field(default=default, metadata={"range": Range(lo, hi, above)})


def option_ranges(cls: type["Pass"] | "Pass") -> dict[str, Range]:
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls) if "range" in f.metadata}


def describe_options(cls: type["Pass"]) -> str:
    """'bits=None (1..8), group=None (>= 0), embeddings=False': each option, its default and its declared range."""
    ranges = option_ranges(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "?"
        out.append(f"{f.name}={default}" + (f" ({ranges[f.name]})" if f.name in ranges else ""))
    return ", ".join(out)


def check_ranges(p: "type[Pass] | Pass", values: dict[str, Any] | None = None) -> None:
    """Refuse options outside their declared ranges, naming the pass and the option: those of the pass `p`, or
    `values` (option -> value) meant for the pass class `p`."""
    for key, rng in option_ranges(p).items():
        if values is not None and key not in values:
            continue
        value = values[key] if values is not None else getattr(p, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
            raise PassError(f"option {key}={value!r} of pass {p.name!r} must be a number ({rng})")
        if not rng.admits(value):
            raise PassError(f"option {key}={value} of pass {p.name!r} is out of range: it must be {rng}")


@dataclass
class PassContext:
    """What passes share beyond the graph: calibration data, the model loader's tokenizer, logs, settings."""

    calib_inputs: list[tuple] = field(default_factory=list)  # batches of model inputs for calibration
    stats: dict[str, Any] = field(default_factory=dict)  # facts passes leave for later ones (e.g. Hessians)
    facts: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print
    records: list[dict] = field(default_factory=list)  # per-pass timings and notes, for the manifest
    pipeline: list["Pass"] = field(default_factory=list)  # every pass of the run, in order (set by PassManager)

    def pipeline_specs(self) -> list[str] | None:
        """What the manifest will record for the pipeline (size planners count it); None outside a PassManager."""
        return [p.spec() for p in self.pipeline] or None


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    def run(self, graph: Graph, ctx: PassContext) -> Graph:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        """Whether run() reads ctx.calib_inputs (the driver only builds them when some pass does)."""
        return False

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options().items() if v is not None)
        return f"{self.name}{{{opts}}}" if opts else self.name

    def fingerprint(self) -> str:
        payload = json.dumps({"name": self.name, "version": self.version, "options": self.options()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'a,b{x=1,y=z},c' -> [('a', {}), ('b', {'x': '1', 'y': 'z'}), ('c', {})]."""
    out: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(spec)
    while i < n:
        j = i
        while j < n and spec[j] not in ",{":
            j += 1
        name = spec[i:j].strip()
        opts: dict[str, str] = {}
        if j < n and spec[j] == "{":
            k = spec.find("}", j)
            if k < 0:
                raise PassError(f"unclosed '{{' in pass spec {spec!r}")
            for item in filter(None, (s.strip() for s in spec[j + 1 : k].split(","))):
                key, eq, val = item.partition("=")
                if not eq:
                    raise PassError(f"pass option {item!r} in {spec!r} must be key=value")
                opts[key.strip()] = val.strip()
            j = k + 1
        if not name:
            raise PassError(f"empty pass name in spec {spec!r}")
        out.append((name, opts))
        while j < n and spec[j] in ", ":
            j += 1
        i = j
    return out


def coerce_options(cls: type[Pass], opts: dict[str, Any]) -> dict[str, Any]:
    """Turn spec strings into the field types of the pass (int, float, bool, str, optional)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, val in opts.items():
        if key not in fields:
            raise PassError(f"pass {cls.name!r} has no option {key!r} (options: {', '.join(fields) or 'none'})")
        out[key] = _coerce(val, str(fields[key].type), cls.name, key)
    check_ranges(cls, out)
    return out


def _coerce(val: Any, typ: str, pname: str, key: str) -> Any:
    if not isinstance(val, str):
        return val
    if val in ("None", "none") and "None" in typ:
        return None
    try:
        if typ.startswith("bool"):
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(val)
            return val.lower() in ("1", "true", "yes")
        if typ.startswith("int"):
            return int(val)
        if typ.startswith("float"):
            return float(val)
    except ValueError:
        raise PassError(f"option {key}={val!r} of pass {pname!r} is not a valid {typ}") from None
    return val


class PassManager:
    def __init__(self, passes: list[Pass], dump_dir: Path | None = None, verify_each: bool = True):
        for p in passes:  # passes built in Python skip the spec parser: check their ranges before any work
            check_ranges(p)
        self.passes = passes
        self.dump_dir = dump_dir
        self.verify_each = verify_each

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.ir").write_text(print_graph(graph))
        done: list[str] = []
        ctx.pipeline = list(self.passes)
        heap.bound_retention()
        for i, p in enumerate(self.passes, 1):
            missing = p.requires - ctx.facts
            if missing:
                raise PassError(
                    f"pass {p.name!r} requires {sorted(missing)}, which no earlier pass provides "
                    f"(ran before it: {', '.join(done) or 'nothing'})"
                )
            t0 = time.perf_counter()
            try:
                graph = p.run(graph, ctx)
                if self.verify_each:
                    verify(graph)
            except Exception as err:
                raise PassError(f"pass {p.spec()!r} failed (after {', '.join(done) or 'no passes'}): {err}") from err
            ctx.facts |= p.provides
            heap.release()  # what the pass freed goes back to the system before the next one allocates
            ctx.records.append({"pass": p.spec(), "fingerprint": p.fingerprint(), "seconds": round(time.perf_counter() - t0, 3)})
            done.append(p.name)
            if self.dump_dir:
                (self.dump_dir / f"{i:02d}-{p.name}.ir").write_text(print_graph(graph))
        return graph
