"""``python -m featurestore``: inspect, verify and clean a store from the shell.

Exit codes: 0 success; 1 ``verify`` found problems; 2 bad usage, or an error the user can fix
(a store that cannot be opened, an entry that does not exist: the message says which and what
to do).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import catalog
from .errors import UserError
from .store import FeatureStore


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_ls(args: argparse.Namespace) -> int:
    infos = catalog.list_entries(FeatureStore(args.url, create=False))
    if args.json:
        print(json.dumps([i.to_json() for i in infos]))
        return 0
    print(f"{'KEY':<32} {'KIND':<10} {'ROWS':>8} {'SIZE':>10} {'COMPLETE':<9} SUMMARY")
    for i in infos:
        print(f"{i.key:<32} {i.kind:<10} {i.rows:>8} {_size(i.stored_bytes):>10} {'yes' if i.complete else 'no':<9} "
              f"{i.summary}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(catalog.describe(FeatureStore(args.url, create=False), args.key), indent=1))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = catalog.verify(FeatureStore(args.url, create=False), args.key)
    for problem in report.problems:
        print(f"{args.key}: {problem}", file=sys.stderr)
    print(json.dumps({"key": args.key, "ok": report.ok, "shards_checked": report.shards_checked,
                      "problems": report.problems}))
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    store = FeatureStore(args.url, create=False)
    if args.unreferenced and not args.keep:
        raise SystemExit("gc --unreferenced needs at least one --keep KEY (the entries still in use)")
    actions = catalog.plan_gc(store, args.older_than_hours * 3600, set(args.keep) if args.unreferenced else None)
    for a in actions:
        print(f"{'remove' if args.delete else 'would remove'} {a.key} ({_size(a.stored_bytes)}): {a.reason}",
              file=sys.stderr)
    removed = catalog.run_gc(store, actions) if args.delete else 0
    print(json.dumps({"entries": [a.key for a in actions], "deleted": bool(args.delete),
                      "objects_removed": removed, "bytes": sum(a.stored_bytes for a in actions)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m featurestore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list entries: key, kind, rows, size, complete?, summary")
    p.add_argument("url", help="store: a local directory or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("info", help="spec, layout, lineage and progress of one entry (JSON)")
    p.add_argument("url")
    p.add_argument("key")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="check commit records, objects, sizes and checksums; exit 1 on any problem")
    p.add_argument("url")
    p.add_argument("key")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("gc", help="remove stale incomplete entries (and unreferenced ones); dry run by default")
    p.add_argument("url")
    p.add_argument("--older-than-hours", type=float, default=24.0,
                   help="incomplete entries idle for longer than this are removed (default 24)")
    p.add_argument("--unreferenced", action="store_true",
                   help="also remove complete entries that are not kept and not an ancestor of a kept entry")
    p.add_argument("--keep", action="append", default=[], metavar="KEY", help="an entry still in use (repeatable)")
    p.add_argument("--delete", action="store_true", help="actually delete (default: only print the plan)")
    p.set_defaults(func=cmd_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:  # StoreError, EntryNotFound, CorruptEntry, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
