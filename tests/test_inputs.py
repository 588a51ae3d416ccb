"""The input suite: every way users hand cells to sclcm gives the canonical result or an
``InputError`` that names the problem and the fix, and never changes the user's object.

One real sample (Kang 2018 IFN-beta PBMCs, counts capped at 127 so that every integer and
float dtype holds them exactly) is varied along the axes users vary: matrix format and
canonical form, dtype, storage (in memory, view, backed, backed view), where the counts are,
empty cells and genes, duplicated names, and gene identifiers (symbols, Ensembl IDs,
versioned IDs, mouse Ensembl IDs). Each variant goes through ``pp.check_counts``,
``pp.tokenize``, ``tl.embed`` and ``tl.perturb`` and is compared with the same tool on the
canonical in-memory CSR float32 object (restricted to the same cells and genes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
from conftest import EMBED_TOL, KANG_IFNB, assert_unchanged, snapshot
from scipy import sparse

import sclcm

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CELLS = 24
TOOLS = ("check_counts", "tokenize", "embed", "perturb")


@pytest.fixture(scope="module")
def base(request) -> ad.AnnData:
    """The canonical object: CSR float32 counts of real cells, symbols in var_names."""
    from conftest import data_path

    full = ad.read_h5ad(data_path(KANG_IFNB))
    rng = np.random.default_rng(0)
    a = full[np.sort(rng.choice(full.n_obs, N_CELLS, replace=False))].copy()
    X = sparse.csr_matrix(a.X, dtype=np.float32)
    X.data = np.minimum(X.data, 127)
    a.X = X
    a.obs = a.obs[["cell_type"]].copy()
    a.var = a.var[["ensembl_id"]].copy()
    # the genes every representation names alike: a symbol and its Ensembl ID can resolve
    # to different genes (alt-haplotype IDs, symbols of two genes), which is the data, not
    # the input form
    by_symbol = sclcm.genes.resolve(ad.AnnData(var=a.var.iloc[:, :0]), count_coverage=False
                                    ).ensembl_id
    by_id = sclcm.genes.resolve(ad.AnnData(var=a.var.set_index("ensembl_id")),
                                count_coverage=False).ensembl_id
    same = np.asarray([s is not None and s == i for s, i in zip(by_symbol, by_id,
                                                                 strict=True)])
    return a[:, same].copy()


@pytest.fixture(scope="module")
def model():
    return sclcm.tl.get_model(device="cpu")


#: Genes knocked out in silico (both with a one-to-one mouse ortholog).
TARGETS = ["ISG15", "STAT1"]


def run(tool: str, adata: ad.AnnData, model, layer: str | None = None,
        targets: list[str] = TARGETS):
    """One tool's result on ``adata``, as arrays to compare (``targets``: the knockouts'
    names in ``adata``'s own identifiers)."""
    if tool == "check_counts":
        sclcm.pp.check_counts(adata, layer=layer)
        return {}
    if tool == "tokenize":
        b = sclcm.pp.tokenize(adata, model.tokenizer, layer=layer)
        return {"gene_ids": b.gene_ids, "values": b.values, "offsets": b.offsets,
                "cell_index": b.cell_index}
    if tool == "embed":
        sclcm.tl.embed(adata, model, layer=layer)
        return {"X_sclcm": adata.obsm["X_sclcm"]}
    sclcm.tl.perturb(adata, targets, model=model, mode="delete", layer=layer,
                     n_null=2, random_state=0)
    return {"sclcm_perturb": adata.obsm["sclcm_perturb"]}


@dataclass
class Variant:
    """An input built from the canonical object, and what each tool must do with it."""

    name: str
    make: Callable[[ad.AnnData, object], ad.AnnData]
    layer: str | None = None
    #: tool -> regex of the InputError it must raise (absent: the canonical result)
    errors: dict[str, str] = field(default_factory=dict)
    #: the canonical cells and genes the result corresponds to
    rows: Callable[[ad.AnnData], np.ndarray] | None = None
    cols: Callable[[ad.AnnData], np.ndarray] | None = None


def _with_X(X) -> Callable:
    def make(a, _):
        out = a.copy()
        out.X = X(a.X)
        return out
    return make


def _non_canonical(X):
    """The same counts with every entry stored as two halves (and shuffled columns)."""
    X = X.tocoo()
    half = X.data / 2
    rows, cols = np.r_[X.row, X.row], np.r_[X.col, X.col]
    data = np.r_[half, X.data - half]
    # shuffled, then grouped by row: (data, indices, indptr) keeps the duplicates, which
    # csr_matrix((data, (i, j))) would sum
    order = np.random.default_rng(1).permutation(len(rows))
    order = order[np.argsort(rows[order], kind="stable")]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=X.shape[0]))]
    out = sparse.csr_matrix((data[order], cols[order], indptr), shape=X.shape)
    assert not out.has_canonical_format
    return out


def _unsorted(X):
    X = X.tocsr(copy=True)
    for i in range(X.shape[0]):
        s = slice(X.indptr[i], X.indptr[i + 1])
        X.indices[s], X.data[s] = X.indices[s][::-1].copy(), X.data[s][::-1].copy()
    X.has_sorted_indices = False
    return X


def _store_zeros(X):
    """Store an explicit zero for the first unexpressed gene of every cell."""
    dense = X.toarray()
    mask = dense != 0
    for i in range(dense.shape[0]):
        mask[i, np.flatnonzero(dense[i] == 0)[0]] = True
    rows, cols = np.nonzero(mask)
    return sparse.csr_matrix((dense[rows, cols], cols,
                              np.r_[0, np.cumsum(mask.sum(1))]), shape=X.shape)


def _view(a, _):
    big = ad.concat([a, a[:3]], index_unique="-", merge="same")  # keeps var["ensembl_id"]
    big.obs_names = [*a.obs_names, "x1", "x2", "x3"]
    return big[: a.n_obs]


def _backed(tmp, view: bool):
    def make(a, _):
        path = tmp / f"cells{'_view' if view else ''}.h5ad"
        a.write_h5ad(path)
        b = ad.read_h5ad(path, backed="r")
        return b[: a.n_obs - 1] if view else b
    return make


def _counts_in_layer(a, _):
    out = a.copy()
    out.layers["counts"] = out.X.copy()
    out.X = sparse.csr_matrix(np.log1p(out.X.toarray() / out.X.sum(1).A * 1e4))
    return out


def _no_X(a, _):
    out = ad.AnnData(obs=a.obs.copy(), var=a.var.copy(), layers={"counts": a.X.copy()})
    return out


def _empty_cell(a, _):
    out = a.copy()
    X = out.X.tolil()
    X[2, :] = 0
    out.X = sparse.csr_matrix(X)
    out.X.eliminate_zeros()
    return out


def _empty_genes(a, _):
    zeros = ad.AnnData(sparse.csr_matrix((a.n_obs, 3), dtype=np.float32), obs=a.obs.copy())
    zeros.var_names = ["CD19", "INS", "GCG"]  # real genes no PBMC here expresses
    zeros.var["ensembl_id"] = ["ENSG00000177455", "ENSG00000254647", "ENSG00000115263"]
    assert not set(zeros.var_names) & set(a.var_names)
    out = ad.concat([a, zeros], axis=1, merge="first")
    out.var["ensembl_id"] = [*a.var["ensembl_id"], *zeros.var["ensembl_id"]]
    out.obs = a.obs.copy()
    return out


def _dup_obs(a, _):
    out = a.copy()
    names = list(out.obs_names)
    names[1] = names[0]
    out.obs_names = names
    return out


def _ids(suffix: str) -> Callable:
    def make(a, _):
        out = a.copy()
        out.var_names = [f"{e}{suffix}" for e in out.var["ensembl_id"]]
        return out
    return make


def _one2one(a) -> np.ndarray:
    from sclcm.genes._reference import ortholog_table

    t = ortholog_table().query("one2one")
    return np.flatnonzero(a.var["ensembl_id"].isin(t["human_id"]).to_numpy())


def _mouse(a, _):
    from sclcm.genes._reference import ortholog_table

    t = ortholog_table().query("one2one").set_index("human_id")["mouse_id"]
    out = a[:, _one2one(a)].copy()
    out.var_names = t.loc[out.var["ensembl_id"]].to_numpy()
    out.var = out.var.drop(columns="ensembl_id")
    return out


INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
VARIANTS = [
    Variant("csr_matrix", lambda a, _: a.copy()),
    Variant("dense", _with_X(lambda X: X.toarray())),
    Variant("csc_matrix", _with_X(sparse.csc_matrix)),
    Variant("csr_array", _with_X(sparse.csr_array)),
    Variant("csc_array", _with_X(sparse.csc_array)),
    Variant("non_canonical_duplicates", _with_X(_non_canonical)),
    Variant("unsorted_indices", _with_X(_unsorted)),
    Variant("explicit_zeros", _with_X(_store_zeros)),
    *[Variant(f"{d}_csr", _with_X(lambda X, d=d: X.astype(d))) for d in INT_DTYPES],
    Variant("float64_csr", _with_X(lambda X: X.astype(np.float64))),
    Variant("float16_dense", _with_X(lambda X: X.toarray().astype(np.float16))),
    Variant("int64_dense", _with_X(lambda X: X.toarray().astype(np.int64))),
    Variant("bool", _with_X(lambda X: X.astype(bool)),
            errors=dict.fromkeys(TOOLS, r"dtype bool.*astype\(np\.float32\)")),
    Variant("view", _view),
    Variant("counts_in_layer", _counts_in_layer, layer="counts"),
    Variant("log_data_in_X", lambda a, _: _counts_in_layer(a, _),
            errors={"check_counts": r"non-integer values.*layer=",
                    "embed": r"non-integer values.*layer=",
                    "perturb": r"non-integer values.*layer=",
                    "tokenize": r"non-integer"}),
    Variant("X_absent", _no_X, layer="counts"),
    Variant("X_absent_no_layer", _no_X, errors=dict.fromkeys(TOOLS, r"adata\.X is empty.*layer=")),
    Variant("empty_cell", _empty_cell,
            errors={"check_counts": r"1 cells have no counts.*filter_cells"}),
    Variant("empty_genes", _empty_genes, cols=lambda a: np.arange(a.n_vars)),
    Variant("duplicated_obs_names", _dup_obs,
            errors={t: r"duplicated.*obs_names_make_unique" for t in
                    ("check_counts", "embed", "perturb")}),
    Variant("ensembl_ids", _ids("")),
    Variant("versioned_ensembl_ids", _ids(".7")),
    Variant("mouse_ensembl_ids", _mouse, cols=_one2one),
]
BACKED = [
    ("backed", False, {}),
    ("backed_view", True, {t: r"view of a backed AnnData.*to_memory\(\)"
                           for t in ("embed", "perturb")}),
]


def _reference(base, variant_cols, rows, tool, model, cache):
    """The tool's result on the canonical object with the variant's genes and cells."""
    key = (tool, None if variant_cols is None else tuple(variant_cols),
           None if rows is None else tuple(rows))
    if key not in cache:
        a = base if variant_cols is None else base[:, variant_cols].copy()
        a = a if rows is None else a[rows].copy()
        cache[key] = run(tool, a.copy(), model)
    return cache[key]


_CACHE: dict = {}


def _check(variant: Variant, tool: str, base, model, tmp_path):
    adata = variant.make(base, tmp_path)
    before = snapshot(adata) if not adata.isbacked else None
    want_error = variant.errors.get(tool)
    if want_error is not None:
        with pytest.raises(sclcm.InputError, match=want_error):
            run(tool, adata, model, variant.layer)
        if before is not None:
            assert_unchanged(adata, before)
        return
    cols = variant.cols(base) if variant.cols else np.arange(base.n_vars)
    # the same genes, named as this variant names them
    position = {g: i for i, g in enumerate(base.var_names[cols])}
    targets = [adata.var_names[position[g]] for g in TARGETS]
    got = run(tool, adata, model, variant.layer, targets)
    cols = None if variant.cols is None else cols
    rows = None
    if variant.name == "empty_cell" and tool in ("tokenize", "embed", "perturb"):
        # the empty cell has no token; the others are the canonical result
        rows = np.delete(np.arange(base.n_obs), 2)
        if tool == "embed":
            assert np.isnan(got["X_sclcm"][2]).all()
            got = {"X_sclcm": got["X_sclcm"][rows]}
        elif tool == "perturb":
            got = {"sclcm_perturb": got["sclcm_perturb"][rows]}
    if variant.name.startswith("backed_view"):
        rows = np.arange(base.n_obs - 1)
    want = _reference(base, cols, rows, tool, model, _CACHE)
    if tool == "tokenize" and variant.name == "empty_cell":
        want = {**want, "cell_index": rows[want["cell_index"]]}
    assert set(got) == set(want)
    for k in want:
        if k in ("gene_ids", "offsets", "cell_index"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        elif k == "values":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], **EMBED_TOL, equal_nan=True, err_msg=k)
    if before is not None:  # the tool added its results and changed nothing else
        assert_unchanged_but_results(adata, before)


def assert_unchanged_but_results(adata, before):
    for key in ("X_sclcm", "sclcm_perturb"):
        before["obsm"].add(key) if key in adata.obsm else None
    for key in ("sclcm", "sclcm_perturb"):
        before["uns"].add(key) if key in adata.uns else None
    assert_unchanged(adata, before)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_input(variant, tool, base, model, tmp_path):
    _check(variant, tool, base, model, tmp_path)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("name", "view", "errors"), BACKED, ids=[b[0] for b in BACKED])
def test_backed_input(name, view, errors, tool, base, model, tmp_path):
    _check(Variant(name, _backed(tmp_path, view), errors=errors), tool, base, model, tmp_path)
