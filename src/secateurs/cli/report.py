"""``secateurs report DIR... --out report/``: a markdown page with PNG figures for result folders."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("report", help="markdown page with figures (pruning map, quality vs ratio / speedup, settings)",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="result folders (from prune / apply), or folders holding them one level down")
    p.add_argument("--out", default="report", help="output folder (default report/)")


def run(args):
    from ..report import build_report

    page = build_report(args.dirs, args.out)
    print(f"report written to {page}")
