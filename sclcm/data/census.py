"""Command line: write .h5ad files as a local Census.

    python -m sclcm.data.census OUT IN.h5ad [IN.h5ad ...] [--obs donor_id=donor] [--overwrite]

Then ``cellxgene_census.open_soma(uri="OUT")`` opens it like the hosted Census, and
``sclcm.data.CensusStream(uri="OUT", organism="Homo sapiens")`` streams it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sclcm.data.census",
                                     description="Write .h5ad files as a local Census.")
    parser.add_argument("out", help="folder of the new SOMA store")
    parser.add_argument("inputs", nargs="+", type=Path, help=".h5ad files of raw counts")
    parser.add_argument("--obs", action="append", default=[], metavar="CENSUS=SOURCE",
                        help="fill a Census obs column from a source obs column (repeatable)")
    parser.add_argument("--layer", default=None, help="layer with the counts (default: X)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)
    mapping = {}
    for item in args.obs:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--obs takes CENSUS=SOURCE, not {item!r}")
        mapping[key] = value

    import cellxgene_census

    from . import write_local_census

    uri = write_local_census(args.inputs, args.out, obs_columns=mapping, layer=args.layer,
                             overwrite=args.overwrite)
    with cellxgene_census.open_soma(uri=uri) as census:
        counts = census["census_info"]["summary_cell_counts"].read(
            value_filter="category == 'all'").concat().to_pandas()
    print(f"local Census at {uri}")
    print(counts[["organism", "total_cell_count", "unique_cell_count"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
