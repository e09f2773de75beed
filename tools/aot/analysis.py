"""What a compiled program costs per chip: memory (XLA's buffer assignment), FLOPs counted through
loops, and the collectives with their bytes per step.

XLA's `cost_analysis()` counts a `while` body (a scanned stack of blocks) once and a custom call (a
Pallas kernel) as nothing, so FLOPs are counted here from the program's jaxpr instead: every matrix
product and convolution, a scan's body times its length, a Pallas kernel's body times its grid, a
`shard_map` body times the devices it runs on, and of a platform-dependent choice only the branch
for the target platform. Elementwise work is not counted (the analytic model count leaves it out too).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

# ------------------------------------------------------------------------------------------ FLOPs


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in lhs_contract)


def _conv_flops(eqn) -> float:
    """2 x output elements x (kernel taps x input features per group): rhs_spec[0] is the kernel's
    output-feature axis, the others its input features and taps."""
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[d] for d in dn.rhs_spec[1:])


def _sub_jaxprs(params: dict):
    for value in params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield inner
            elif hasattr(v, "eqns"):
                yield v


def jaxpr_flops(jaxpr, platform: str) -> float:
    """Matrix-product and convolution FLOPs of a jaxpr (module doc), for a program lowered for `platform`."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, platform)
        elif name == "cond":
            branches = [b.jaxpr for b in eqn.params["branches"]]
            platforms = eqn.params.get("branches_platforms")
            if platforms:
                pick = next((i for i, ps in enumerate(platforms) if ps is not None and platform in ps),
                            next(i for i, ps in enumerate(platforms) if ps is None))
                total += jaxpr_flops(branches[pick], platform)
            else:
                total += max(jaxpr_flops(b, platform) for b in branches)
        elif name == "pallas_call":
            grid = eqn.params["grid_mapping"].grid
            total += math.prod(int(g) for g in grid) * jaxpr_flops(eqn.params["jaxpr"], platform)
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            total += math.prod(mesh.shape.values()) * jaxpr_flops(eqn.params["jaxpr"], platform)
        else:
            for inner in _sub_jaxprs(eqn.params):
                total += jaxpr_flops(inner, platform)
    return total


# ------------------------------------------------------------------------------------ memory


def memory(compiled) -> dict[str, int]:
    """Per-chip bytes from XLA's buffer assignment: arguments, outputs (less those aliased to donated
    arguments), temporaries, generated code, and their total on the device; and the temporaries the
    program keeps in its host's memory (remat "offload"), which the total leaves out."""
    m = compiled.memory_analysis()
    args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    return {"args_bytes": int(args), "output_bytes": int(out - alias), "temp_bytes": int(temp),
            "code_bytes": int(code), "total_bytes": int(args + out - alias + temp + code),
            "host_temp_bytes": int(m.host_temp_size_in_bytes)}


def out_of_memory_bytes(message: str) -> int | None:
    """What the TPU compiler said a refused program needs ("... HLO temporaries (28.34G) exceeds
    available HBM (15.25G)"), in bytes; None for another error."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([0-9.]+)([KMGT])\)", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


# ------------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            total += (math.prod(int(d) for d in dims.split(",") if d) if dims else 1) * _DTYPE_BYTES[dtype]
    return total


def _tuple_elements(shape_text: str) -> list[str]:
    """The top-level elements of a tuple shape "(a, (b, c), d)"; [shape_text] for an array shape."""
    text = shape_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:-1])
    return parts


def _result_bytes(shape_text: str, asynchronous: bool) -> int:
    """Bytes a collective produces: every array of a (possibly combined, tuple-shaped) collective; of
    an async start's (operands, results, ...) tuple, the results."""
    if asynchronous:
        elements = _tuple_elements(shape_text)
        return _array_bytes(elements[1] if len(elements) > 1 else elements[0])
    return _array_bytes(shape_text)


def _trip_count(while_line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the s32 bound its condition compares
    the counter with (jax's scans count from 0 with `<`); 1 when neither is found."""
    known = _TRIP.search(while_line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = comps.get(cond.group(1), []) if cond else []
    if any("direction=LT" in ln for ln in lines):
        bounds = [int(m) for ln in lines for m in re.findall(r"s32\[\][^=]*constant\((\d+)\)", ln)]
        if len(bounds) == 1:
            return bounds[0]
    return 1


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{collective: {"count": per step, "bytes": per step}} from a compiled module's text: each
    collective's result bytes (`_result_bytes`) times how often its computation runs (a while body:
    its trip count, `_trip_count`; nested loops multiply)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    if entry is None:
        return {}
    # how many times each computation runs per step
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = _trip_count(line, comps) if " while(" in line else 1
            for kind, target in _CALLS.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
                    calls[name].append((callee, trip if kind in ("body", "condition") else 1))
    runs: dict[str, float] = defaultdict(float)

    def visit(name: str, times: float, depth: int = 0):
        runs[name] += times
        if depth < 64:
            for callee, factor in calls.get(name, ()):
                if callee in comps:
                    visit(callee, times * factor, depth + 1)

    visit(entry, 1.0)
    out: dict[str, dict[str, float]] = {}
    for name, lines in comps.items():
        if not runs.get(name):
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            shape, op = m.groups()
            asynchronous = op.endswith("-start")
            base = op[:-len("-start")] if asynchronous else op
            if base not in COLLECTIVES:
                continue
            entry_ = out.setdefault(base, {"count": 0.0, "bytes": 0.0})
            entry_["count"] += runs[name]
            entry_["bytes"] += runs[name] * _result_bytes(shape, asynchronous)
    return out
