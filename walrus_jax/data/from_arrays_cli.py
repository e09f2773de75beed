"""The command line of walrus_jax.data.from_arrays: .npy / .npz files -> a Well file or dataset folder.

    python -m walrus_jax.data.from_arrays --root DIR --name my_flow \\
        --field my_tracer=run.npz:c --vector velocity=run.npz:u --dt 0.1 --spacing 0.05 \\
        --bc x=periodic --bc y=wall [--splits train=0.8,valid=0.1,test=0.1]
    python -m walrus_jax.data.from_arrays --file out.hdf5 --name my_flow --field u=u.npy --dt 0.1 ...

(`python -m walrus_jax.data.from_arrays_cli` is the same.) Exit status 0, or 2 with one `error:` line
for any mistake in the inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from walrus_jax.data.from_arrays import write_arrays, write_dataset
from walrus_jax.errors import DataError, PathError, run_command, verbose_requested

NPY_MAGIC, NPZ_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


def numpy_file_problem(path: str, want: str = ".npy/.npz") -> str | None:
    """Why `path` is not a NumPy .npy / .npz file, judged by its first bytes (numpy itself would try
    it as a pickle and blame "pickled (object) data"); None when it starts like one."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC) or head.startswith(NPZ_MAGIC):
        return None
    if not head:
        return f"not a NumPy {want} file: it is empty"
    text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return (f"not a NumPy {want} file: it starts with {head!r}" + (" (a text file)" if text else "")
            + f"; expected a file written by numpy.save / numpy.savez")


def _load_array(spec: str, flag: str) -> tuple[str, np.ndarray]:
    """'NAME=FILE.npy' or 'NAME=FILE.npz:KEY' (KEY may be omitted when the .npz holds one array)."""
    if "=" not in spec:
        raise DataError(f"{flag} {spec!r}: expected NAME=FILE.npy or NAME=FILE.npz:KEY")
    name, src = spec.split("=", 1)
    path, key = src, None
    if ".npz:" in src:
        path, key = src.rsplit(":", 1)
    if not os.path.isfile(path):
        raise PathError(f"{flag} {spec!r}: {path}: no such file")
    problem = numpy_file_problem(path)
    if problem:
        raise DataError(f"{flag} {spec!r}: {path}: {problem}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # a corrupt or non-numpy file
        raise DataError(f"{flag} {spec!r}: {path}: cannot be read as .npy/.npz ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = list(data.keys())
            if key is None:
                if len(keys) != 1:
                    raise DataError(f"{flag} {spec!r}: {path} holds arrays {keys}: name one as {path}:KEY")
                key = keys[0]
            if key not in keys:
                raise DataError(f"{flag} {spec!r}: {path} has no array {key!r} (it holds {keys})")
            return name, np.asarray(data[key])
    if key is not None:
        raise DataError(f"{flag} {spec!r}: {path} is a .npy file (one array): drop ':{key}'")
    return name, np.asarray(data)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise DataError(f"{flag} {text!r}: expected a number or comma-separated numbers") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, as for every other user mistake
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _parse_args(argv):
    ap = _Parser(prog="python -m walrus_jax.data.from_arrays",
                                 description="Write numpy arrays (.npy/.npz) as a Well-format file or dataset.")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--file", help="write one Well file (.hdf5)")
    out.add_argument("--root", help="write a dataset folder ROOT/NAME/data/{train,valid,test}/ + stats.yaml")
    ap.add_argument("--name", required=True, help="dataset name")
    for flag, rank, what in (("--field", 0, "scalar field"), ("--vector", 1, "vector field"),
                             ("--tensor", 2, "rank-2 tensor field")):
        ap.add_argument(flag, action="append", default=[], metavar="NAME=FILE[:KEY]",
                        help=f"a {what}, array (n_traj, n_time, *spatial{', n_dims' * rank})")
    for flag, rank, what in (("--constant", 0, "scalar"), ("--constant-vector", 1, "vector"),
                             ("--constant-tensor", 2, "rank-2 tensor")):
        ap.add_argument(flag, action="append", default=[], metavar="NAME=FILE[:KEY]",
                        help=f"a constant {what} field, (n_traj, *spatial, ...) or (*spatial, ...)")
    t = ap.add_mutually_exclusive_group(required=True)
    t.add_argument("--dt", type=str, help="time between frames (> 0)")
    t.add_argument("--time", metavar="FILE[:KEY]", help="the frame times, an (n_time,) array")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--spacing", help="grid spacing: one number or one per axis (comma-separated)")
    g.add_argument("--coords", metavar="FILE.npz", help="coordinates: an .npz with one 1-D array per axis name")
    ap.add_argument("--origin", default="0", help="coordinates of the first grid point (with --spacing)")
    ap.add_argument("--bc", action="append", default=[], metavar="AXIS=TYPE[,TYPE]",
                    help="boundary condition per axis: periodic, wall or open, or LOW,HIGH (e.g. y=wall,open)")
    ap.add_argument("--dims", help="spatial axis names, comma-separated (default x,y,z)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a simulation parameter")
    ap.add_argument("--splits", default="train=0.8,valid=0.1,test=0.1",
                    help="with --root: fractions of the trajectories per split (default train=0.8,valid=0.1,test=0.1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing file or dataset folder")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """The command line: 0, or 2 and one `error:` line for any mistake in the inputs (or a full disk)."""
    args = _parse_args(argv)
    return run_command(lambda: _run(args), args.verbose or verbose_requested())


def _run(args) -> None:
    fields, constants = {}, {}
    for target, flags in ((fields, (("--field", 0), ("--vector", 1), ("--tensor", 2))),
                          (constants, (("--constant", 0), ("--constant-vector", 1), ("--constant-tensor", 2)))):
        for flag, rank in flags:
            for spec in getattr(args, flag[2:].replace("-", "_")):
                name, a = _load_array(spec, flag)
                if name in fields or name in constants:
                    raise DataError(f"{flag} {spec!r}: field {name!r} given twice")
                target[name] = (a, rank)
    if not fields:
        raise DataError("no fields: give at least one --field, --vector or --tensor NAME=FILE")
    bcs = {}
    for spec in args.bc:
        if "=" not in spec:
            raise DataError(f"--bc {spec!r}: expected AXIS=TYPE or AXIS=LOW,HIGH (e.g. x=periodic, y=wall,open)")
        axis, kinds = spec.split("=", 1)
        kinds = kinds.split(",")
        bcs[int(axis) if axis.isdigit() else axis] = kinds[0] if len(kinds) == 1 else tuple(kinds)
    kw = dict(dataset_name=args.name, boundary_conditions=bcs, constant_fields=constants,
              dim_names=args.dims.split(",") if args.dims else None, overwrite=args.overwrite,
              origin=_floats(args.origin, "--origin"))
    if args.dt is not None:
        kw["dt"] = _floats(args.dt, "--dt")[0]
    else:
        kw["time"] = _load_array(f"time={args.time}", "--time")[1]
    if args.spacing is not None:
        kw["spacing"] = _floats(args.spacing, "--spacing")
    else:
        if not os.path.isfile(args.coords):
            raise PathError(f"--coords {args.coords}: no such file")
        try:
            z = np.load(args.coords, allow_pickle=False)
        except Exception as e:  # a corrupt or non-numpy file
            raise DataError(f"--coords {args.coords}: cannot be read as .npz ({e})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"--coords {args.coords}: expected an .npz holding one 1-D array per axis (x, y, ...)")
        with z:
            kw["coords"] = {k: np.asarray(z[k]) for k in z.keys()}
    if len(kw["origin"]) == 1:
        kw["origin"] = kw["origin"][0]
    if "spacing" in kw and len(kw["spacing"]) == 1:
        kw["spacing"] = kw["spacing"][0]
    kw["parameters"] = {}
    for p in args.param:
        if "=" not in p:
            raise DataError(f"--param {p!r}: expected NAME=VALUE")
        k, v = p.split("=", 1)
        kw["parameters"][k] = _floats(v, f"--param {k}")[0]
    if args.file:
        path = write_arrays(args.file, fields, **kw)
        print(f"wrote {path}")
    else:
        splits = {}
        for part in args.splits.split(","):
            if "=" not in part:
                raise DataError(f"--splits {args.splits!r}: expected SPLIT=FRACTION,... (e.g. train=0.8,valid=0.2)")
            s, v = part.split("=", 1)
            splits[s] = _floats(v, f"--splits {s}")[0]
        name = kw.pop("dataset_name")
        path = write_dataset(args.root, name, fields, splits=splits, **kw)
        print(f"wrote {path} (data/{{{','.join(splits)}}}/{name}.hdf5, stats.yaml)")


if __name__ == "__main__":
    sys.exit(main())
