"""What in a `.pt2` archive would run code when `torch.export.load` reads it, found without loading it.

`torch.export.load` is documented as unsafe for untrusted files. Reading torch/export/pt2_archive/_package.py,
torch/export/__init__.py, torch/_export/serde/serialize.py and torch/utils/_pytree.py (torch 2.10-2.13), these are
the parts of an archive that run code stored in it:

- weights and constants a payload config (`data/weights/<model>_weights_config.json`,
  `data/constants/<model>_constants_config.json`) marks `use_pickle`: `torch.load(weights_only=False)`;
- constants named `custom_obj_*` (TorchScript objects, `torch._C._pickle_load_obj`) and `opaque_obj_*`
  (`pickle.loads`);
- the example inputs (`data/sample_inputs/<model>.pt`), legacy weight/constant files (`data/weights/<model>.pt`,
  `data/constants/<model>.pt`) and the files of the pre-2.8 layout (`serialized_*.pt`): `torch.load` with
  `weights_only=True` first and, if that fails, `weights_only=False`;
- compiled native code under `data/aotinductor/` (loaded as a shared library);
- symbolic shape expressions (`expr_str`) in the program's JSON: `sympy.sympify`, which evaluates them as Python;
- guard code (`guards_code`) in the program's JSON: compiled into the module's input check and run on each call;
- tree specs whose contexts name an Enum (`__enum__`) or a defaultdict factory: `importlib.import_module` of a module
  named in the file.

`findings` reports each of these it sees; a pickle is allowed only where torch's weights-only unpickler (which
torch tries first there) accepts it, since torch then never falls back to the full unpickler for it. Everything
else on the list needs the user's consent (`--trust-pickle`). The zip is read with Python's zipfile and torch reads
it with its own reader: archives whose entry names repeat (where the two readers might pick different entries) are
reported too.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
MAX_NOTED = 60  # characters of an offending expression quoted in a message
MAX_JSON_BYTES = 256 << 20  # a program's JSON or a payload config; what a zip entry claims is checked before reading
MAX_PICKLE_BYTES = 4 << 30  # pickles checked with the weights-only loader are read whole


class NotAnArchive(ValueError):
    """The file is not a readable zip archive."""


# Names a shape expression (sympy `srepr` text, or the guard code torch writes) may use: sympy constructors and
# relations, torch's sympy functions and symbol assumptions. No attribute access, subscripts (outside the L[...]
# input references of guards), lambdas or string evaluation can be written with these tokens.
SAFE_NAMES = frozenset(
    """Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge StrictLessThan LessThan
    StrictGreaterThan GreaterThan Equality Unequality And Or Not Xor true false True False None oo zoo nan
    Infinity NegativeInfinity IntInfinity NegativeIntInfinity Zero One NegativeOne Half floor ceiling
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
    FloatPow FloatTrueDiv IntTrueDiv TrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
    RoundDecimal ToFloat Identity BitwiseFn_bitwise_and BitwiseFn_bitwise_or cast_symbool_to_symint_guardless
    positive negative nonnegative nonpositive integer real finite infinite zero nonzero even odd rational
    commutative and or not""".split()
)
_TOKEN = re.compile(
    r"""\s+
    | (?P<ref>L(?:\[(?:'[A-Za-z_][A-Za-z0-9_]*'|\d+)\])+(?:\.(?:size|stride)\(\)\[\d+\]|\.storage_offset\(\))?)
    | (?P<num>\d{1,30}(?:\.\d{1,30})?(?:[eE][-+]?\d{1,3})?)
    | (?P<str>'[A-Za-z_][A-Za-z0-9_]*')
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>==|!=|<=|>=|//|\*\*|[-+*/%<>(),=~&|])""",
    re.X,
)


def plain_expression(text: str, guard: bool = False) -> bool:
    """True when `text` is arithmetic over symbols (and, for guards, input sizes) that evaluates nothing else."""
    if not isinstance(text, str) or len(text) > 20_000:
        return False
    pos, powers, widest = 0, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or (m.group("ref") and not guard):
            return False
        name = m.group("name")
        if name is not None and name not in SAFE_NAMES and not re.fullmatch(r"OpaqueUnaryFn_[a-z0-9]+", name):
            return False
        powers += m.group("op") == "**" or name in _POWERS
        widest = max(widest, len(m.group("num") or ""))
        pos = m.end()
    # sympify evaluates integer powers: Pow(10, Pow(10, 10)) would never finish (a hang, not code, but refused)
    return powers == 0 or (powers == 1 and widest <= 4)


_POWERS = {"Pow", "PowByNatural", "FloatPow"}


def _root_stripped(name: str) -> str:
    """Entry name without the archive's root folder (torch's reader addresses records below it)."""
    return name.split("/", 1)[1] if "/" in name else name


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, string) for every string in a JSON value, with the dict key it sits under."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)
    elif isinstance(value, str):
        yield key, value


def _json_keys(value: Any, nested: int = 0) -> Iterator[str]:
    """Every dict key in a JSON value, descending into strings that hold JSON themselves (tree specs do, twice)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _json_keys(v, nested)
    elif isinstance(value, list):
        for v in value:
            yield from _json_keys(v, nested)
    elif isinstance(value, str) and nested < 4 and value.lstrip()[:1] in ("{", "["):
        try:
            inner = json.loads(value)
        except (ValueError, RecursionError):
            return
        yield from _json_keys(inner, nested + 1)


def _program_findings(name: str, data: bytes) -> list[str]:
    try:
        program = json.loads(data)
    except (ValueError, RecursionError):
        return []  # torch refuses it before evaluating anything
    found = []
    for key, text in _strings(program):
        if key == "expr_str" and not plain_expression(text):
            found.append(f"a shape expression that is not plain arithmetic in {name} ({text[:MAX_NOTED]!r})")
            break
    guards = program.get("guards_code") if isinstance(program, dict) else None
    for text in guards or []:
        if not plain_expression(text, guard=True):
            found.append(f"guard code that is not a plain size comparison in {name} ({str(text)[:MAX_NOTED]!r})")
            break
    for key in _json_keys(program):
        if key in ("__enum__", "default_factory_module", "default_factory_name"):
            found.append(f"a tree spec in {name} that imports Python modules it names ({key!r})")
            break
    return found


def _weights_only_loads(data: bytes) -> bool:
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # anything the restricted unpickler refuses or cannot parse
        return False
    return True


def _payload_findings(z: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], config: str, folder: str,
                      what: str) -> tuple[list[str], set[str]]:
    """Pickled entries of one payload config, and the names of its raw (never unpickled) tensor files."""
    if entries[config].file_size > MAX_JSON_BYTES:
        raise NotAnArchive(f"entry {config} unpacks to {entries[config].file_size:,} bytes")
    try:
        spec = json.loads(z.read(entries[config]))
        items = spec["config"].items()
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], set()  # torch cannot read it either and stops before loading payloads
    found, raw = [], set()
    for fqn, meta in items:
        if not isinstance(meta, dict):
            continue
        path = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            found.append(f"a pickle in {folder}{path} ({what} {fqn!r})")
        elif path.startswith("custom_obj_"):
            found.append(f"a pickled TorchScript object in {folder}{path} ({what} {fqn!r})")
        elif path.startswith("opaque_obj_"):
            found.append(f"a pickled Python object in {folder}{path} ({what} {fqn!r})")
        else:
            raw.add(folder + path)
    return found, raw


def findings(path: Path) -> list[str]:
    """What in the archive at `path` would run code if torch.export.load read it ([] when nothing would).
    Raises NotAnArchive when the file is not a readable zip."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise NotAnArchive(str(err) or type(err).__name__) from None
    with z:
        entries: dict[str, zipfile.ZipInfo] = {}
        found: list[str] = []
        for info in z.infolist():
            name = _root_stripped(info.filename)
            if name in entries:
                found.append(f"two entries named {name!r} (the zip reader torch uses may take either)")
            entries[name] = info
        raw: set[str] = set()
        for name in sorted(entries):
            if re.fullmatch(r"data/weights/[^/]+_weights_config\.json", name):
                more, files = _payload_findings(z, entries, name, "data/weights/", "weight")
            elif re.fullmatch(r"data/constants/[^/]+_constants_config\.json", name):
                more, files = _payload_findings(z, entries, name, "data/constants/", "constant")
            else:
                continue
            found += more
            raw |= files
        for name, info in sorted(entries.items()):
            if name.startswith("data/aotinductor/"):
                found.append(f"compiled native code in {name}")
                break
        for name, info in sorted(entries.items()):
            if name in raw or info.is_dir() or info.file_size == 0:  # torch reads an empty pickle file as nothing
                continue
            limit = MAX_JSON_BYTES if name.endswith(".json") else MAX_PICKLE_BYTES
            if info.file_size > limit:  # a zip bomb would exhaust memory before torch ever saw it
                raise NotAnArchive(f"entry {name} unpacks to {info.file_size:,} bytes, over the {limit:,} xbitc reads")
            try:
                head = z.open(info).read(4) if info.file_size else b""
                if name.endswith(".json"):  # the program (models/<name>.json, or the pre-2.8 layout's) and configs
                    found += _program_findings(name, z.read(info))
                    continue
                pickled = name.endswith(PICKLE_SUFFIXES) or head[:1] == b"\x80" or head == b"PK\x03\x04"
                if pickled and not _weights_only_loads(z.read(info)):
                    found.append(f"a pickle that torch's weights-only loader refuses in {name}")
            except Exception as err:  # a damaged entry: bad CRC, truncated, encrypted, unknown compression
                raise NotAnArchive(f"entry {name}: {err}") from None
        return found
