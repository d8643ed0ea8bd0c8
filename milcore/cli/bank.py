"""``milcore bank``: inspect, verify, merge, convert, import and export feature banks.

Forms::

    milcore bank info    BANK [--json]
    milcore bank verify  BANK [--structure-only] [--no-checksums] [--recover] [--json]
    milcore bank merge   SHARD [SHARD ...] --out BANK [--skip-duplicates] [--dtype D] [--compression C] [--checksum]
    milcore bank convert BANK --out BANK2 [--dtype D] [--compression C] [--chunk-rows R] [--checksum]
    milcore bank import  FOLDER --out BANK [--encoder NAME] [--dtype D] [--compression C] [--checksum]
    milcore bank export  BANK --out FOLDER [--pt] [--dtype D]

Writing commands take ``--overwrite``; ``--json`` prints the result as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

HELP = "inspect, verify, merge, convert, import and export feature banks"
COMPRESSIONS = ("none", "lzf", "gzip", "blosc-zstd")
log = logging.getLogger("milcore")


def _storage_options(parser: argparse.ArgumentParser, chunk_rows: bool = False) -> None:
    parser.add_argument("--dtype", choices=("float16", "float32"), help="stored feature dtype")
    parser.add_argument("--compression", choices=COMPRESSIONS, help="feature compression (default: none)")
    parser.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=None,
                        help="store per-bag checksums of the features (default: on, CRC-32C, where the "
                             "hardware CRC-32C of google-crc32c is available)")
    if chunk_rows:
        parser.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk (0: automatic)")


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``bank`` subcommand and its sub-subcommands."""
    bank = subparsers.add_parser("bank", help=HELP, description=HELP, parents=parents)
    sub = bank.add_subparsers(dest="bank_command", metavar="ACTION", parser_class=type(bank))
    bank.set_defaults(func=run, bank_command=None)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, parents=parents)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        return p

    p = action("info", "summarize a bank: bags, cells, dim, dtype, layout, encoder")
    p.add_argument("bank", help="bank (.h5/.hdf5 file or .zarr folder)")
    p = action("verify", "check schema, storage (every chunk present, of its size, decodable), offsets, dims, "
                         "NaN/Inf and checksums; exit code 2 on any problem")
    p.add_argument("bank", help="bank to verify")
    p.add_argument("--structure-only", action="store_true",
                   help="skip reading the data (chunk files are still checked for presence and size)")
    p.add_argument("--no-checksums", action="store_true", help="do not compare per-bag checksums")
    p.add_argument("--recover", action="store_true", help="first finish a write interrupted by a crash")
    p = action("merge", "merge shards (same encoder) into one bank")
    p.add_argument("inputs", nargs="+", metavar="SHARD", help="input banks")
    p.add_argument("--out", required=True, help="merged bank")
    p.add_argument("--skip-duplicates", action="store_true", help="keep the first copy of a repeated bag id")
    p.add_argument("--accept-mixed-precision", action="store_true",
                   help="merge shards whose features were computed in different precisions (e.g. GPU bfloat16 "
                        "and CPU float32); the merged bank records 'mixed:A+B'")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _storage_options(p, chunk_rows=True)
    p = action("convert", "rewrite a bank as HDF5 or Zarr (by --out suffix), or with another dtype/compression")
    p.add_argument("source", help="input bank")
    p.add_argument("--out", required=True, help="output bank")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _storage_options(p, chunk_rows=True)
    p = action("import", "import a CLAM/TRIDENT folder of per-slide .h5 files")
    p.add_argument("folder", help="folder of <slide>.h5 files (or its parent with h5_files/)")
    p.add_argument("--out", required=True, help="new bank")
    p.add_argument("--encoder", help="encoder name for the fingerprint (default: from the files or folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _storage_options(p)
    p = action("export", "export a bank as a CLAM folder (h5_files/<bag>.h5, optional pt_files/)")
    p.add_argument("bank", help="bank to export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pt", action="store_true", help="also write pt_files/<bag>.pt (torch tensors)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float32", help="feature dtype of the files")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    for line in lines:
        log.info("%s", line)


def _compression(args: argparse.Namespace) -> str | None:
    return getattr(args, "compression", None)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``milcore bank <action>``."""
    from feature_cache.errors import UserError

    action = args.bank_command
    if action is None:
        raise UserError("choose an action: info, verify, merge, convert, import or export (see --help)")
    return {"info": _info, "verify": _verify, "merge": _merge, "convert": _convert,
            "import": _import, "export": _export}[action](args)


def _info(args: argparse.Namespace) -> int:
    from feature_cache.bank import open_reader
    from feature_cache.bank.layout import unfinished_write_message

    with open_reader(args.bank) as bank:  # a bank not written yet: an error naming the writer's pid
        d = bank.describe()
        sizes = bank.bag_sizes()
    busy = unfinished_write_message(args.bank, finished=True)  # a finished bank being replaced or appended to
    d["unfinished_write"] = busy
    if len(sizes):
        d["bag_size"] = {"min": int(sizes.min()), "median": float(sorted(sizes)[len(sizes) // 2]),
                         "max": int(sizes.max()), "empty": int((sizes == 0).sum())}
    enc = d["encoder"]
    lines = [
        f"{d['path']}: {d['backend']} bank, {d['bags']} bags, {d['instances']} cells, {d['dim']}-d {d['dtype']}",
        f"  encoder: {enc['name']} {enc['version']} (fingerprint {enc['fingerprint'][:16]}), "
        f"compute precision: {d['compute_dtype']}",
        f"  features: {d['features']['reader']}, compression {d['features']['compression'] or 'none'}",
        f"  columns: {', '.join(d['columns'])}; bag metadata: {', '.join(d['bag_meta']) or '-'}; "
        f"checksums: {d['checksums'] or 'none'}",
        f"  format {d['format']} {d['format_version']}, created {d['created']}, by {d['generated_by']}",
    ]
    if "bag_size" in d:
        s = d["bag_size"]
        lines.append(f"  cells per bag: min {s['min']}, median {s['median']:g}, max {s['max']}, {s['empty']} empty")
    if busy:
        lines.append(f"  note: {busy.removeprefix(f'{args.bank}: ')}")
    _emit(args, d, lines)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from feature_cache.bank.verify import recover_bank, verify_bank
    from feature_cache.errors import UserError

    if args.recover:
        log.info("%s: recovered; the bank holds %d bags", args.bank, recover_bank(args.bank))
    report = verify_bank(args.bank, data=not args.structure_only, checksums=not args.no_checksums)
    lines = []
    if report.unfinished_write and Path(args.bank).exists():  # else the error says it all
        u = report.unfinished_write
        lines.append(f"note: unfinished write in {u['journal']} ({u['committed_bags']} committed bags; "
                     + ("its writer is running)" if u["writer_running"] else "rerun with --recover to add them)"))
    _emit(args, report.to_dict(), lines)
    if len(report.problems) == 1:
        raise UserError(report.problems[0])
    if report.problems:
        for problem in report.problems:
            log.error("%s", problem)
        first = report.problems[0].removeprefix(f"{args.bank}: ")
        raise UserError(f"{args.bank}: verification failed with {len(report.problems)} problems; first: {first}")
    checked = f", {report.checksums_checked} checksums" if report.checksums_checked else ""
    log.info("%s: OK (%d bags, %d cells%s)", args.bank, report.bags, report.instances, checked)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from feature_cache.bank.merge import merge_banks

    s = merge_banks(args.inputs, args.out, overwrite=args.overwrite, skip_duplicates=args.skip_duplicates,
                    dtype=args.dtype, compression=_compression(args), chunk_rows=args.chunk_rows,
                    checksum=args.checksum, accept_mixed_precision=args.accept_mixed_precision)
    _emit(args, s, [f"wrote {s['output']}: {s['bags']} bags, {s['instances']} cells from {len(s['inputs'])} banks"
                    f" (compute precision {s['compute_dtype']})"])
    return 0


def _convert(args: argparse.Namespace) -> int:
    from feature_cache.bank.convert import convert_bank

    s = convert_bank(args.source, args.out, overwrite=args.overwrite, dtype=args.dtype,
                     compression=_compression(args), chunk_rows=args.chunk_rows, checksum=args.checksum)
    _emit(args, s, [f"wrote {s['output']}: {s['bags']} bags, {s['instances']} cells"])
    return 0


def _import(args: argparse.Namespace) -> int:
    from feature_cache.bank.clam import import_clam

    s = import_clam(args.folder, args.out, encoder=args.encoder, overwrite=args.overwrite,
                    dtype=args.dtype, compression=_compression(args), checksum=args.checksum)
    _emit(args, s, [f"wrote {s['output']}: {s['bags']} bags ({s['empty_bags']} empty), {s['instances']} cells"])
    return 0


def _export(args: argparse.Namespace) -> int:
    from feature_cache.bank.clam import export_clam

    s = export_clam(args.bank, args.out, pt=args.pt, dtype=args.dtype, overwrite=args.overwrite)
    _emit(args, s, [f"wrote {s['files']} files to {s['folder']}/h5_files" + (" and pt_files" if args.pt else "")])
    return 0
