"""Pin the published models on the Hugging Face hub: each entry's commit and files' SHA-256.

    python scripts/pin_published.py                 # print the proposed pins (JSON)
    python scripts/pin_published.py --write         # record them in published_pins.json
    python scripts/pin_published.py --check         # verify the recorded pins against the hub
    python scripts/pin_published.py geneformer-v2-104m --revision <commit> --write

Needs network access to huggingface.co. For each hub entry of ``sclcm.models.published()``
(or those named), the hub's record of the repository at ``--revision`` (default ``main``)
gives the commit and, for LFS files, their SHA-256; the small files kept in git are
downloaded at that commit (into the Hugging Face cache), checked against the blob id the hub
lists and hashed. ``--write`` replaces those entries' pins in
``sclcm/models/published_pins.json`` and keeps the others. ``--check`` recomputes each
recorded pin at its own commit, says whether the branch has moved on, and exits 1 if any
hub entry is unpinned or differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from sclcm.models import _pins, published_model
from sclcm.models._published import _REGISTRY


def main(argv: list[str] | None = None, *, api: Any = None,
         download: _pins.Download | None = None) -> int:
    """Run the command line; ``api`` (``HfApi()``) and ``download`` (``hf_hub_download``
    into ``--cache-dir``) by default reach the hub."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="registry names (default: every hub entry)")
    parser.add_argument("--revision", default="main",
                        help="branch, tag or commit to pin at (default: main)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="record the pins in --pins")
    mode.add_argument("--check", action="store_true",
                      help="verify the recorded pins; exit 1 on a difference or a missing pin")
    parser.add_argument("--pins", type=Path, default=_pins.PINS, help="the pins file")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Hugging Face cache for the small files (default: the user's)")
    args = parser.parse_args(argv)

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    if download is None:
        from huggingface_hub import hf_hub_download

        download = partial(hf_hub_download, cache_dir=args.cache_dir)
    entries = [published_model(n) for n in args.names] or list(_REGISTRY.values())
    entries = [e for e in entries if e.repo_id is not None]
    recorded = _pins.read_pins(args.pins)

    def pin_at(entry: Any, revision: str) -> _pins.Pin:
        info = api.model_info(entry.repo_id, revision=revision, files_metadata=True)
        return _pins.pin_from_info(entry, info, download)

    if args.check:
        failed = 0
        for entry in entries:
            pin = recorded.get(entry.name)
            if pin is None:
                print(f"{entry.name}: not pinned (run with --write)")
                failed += 1
                continue
            differences = _pins.pin_differences(pin, pin_at(entry, pin.revision))
            for line in differences:
                print(f"{entry.name}: {line}")
            failed += bool(differences)
            head = api.model_info(entry.repo_id, revision=args.revision).sha
            moved = "" if head == pin.revision else (
                f"; {args.revision} is now at {head} (run with --write to move the pin)")
            print(f"{entry.name}: {'DIFFERS' if differences else 'ok'} at {pin.revision}{moved}")
        print(f"{len(entries) - failed} of {len(entries)} pins verified")
        return int(failed > 0)

    proposed = {e.name: pin_at(e, args.revision) for e in entries}
    if args.write:
        _pins.apply_pins(_REGISTRY.values(), proposed)  # refuses pins that do not fit
        _pins.write_pins({**recorded, **proposed}, args.pins)
        print(f"wrote {len(proposed)} pins to {args.pins}")
    else:
        print(json.dumps({n: p.as_json() for n, p in proposed.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
