"""The shape of the CELLxGENE Census that a local Census copies: columns, types, tables.

Columns, their order and types follow the Census schema (2.x) and the Census builder:
term columns are dictionary-encoded strings, per-cell statistics float64/int64.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Written into census_info/summary; the layout follows this Census schema version.
CENSUS_SCHEMA_VERSION = "2.1.0"
UNKNOWN = "unknown"

ORGANISMS = {  # experiment name -> (NCBITaxon term, label)
    "homo_sapiens": ("NCBITaxon:9606", "Homo sapiens"),
    "mus_musculus": ("NCBITaxon:10090", "Mus musculus"),
}

#: Labelled obs columns with an ontology term column beside them.
TERMS = ("assay", "cell_type", "development_stage", "disease", "self_reported_ethnicity", "sex",
         "tissue", "tissue_general")
_LABEL = pa.dictionary(pa.int32(), pa.large_string())
OBS_SCHEMA = pa.schema([
    ("soma_joinid", pa.int64()), ("dataset_id", _LABEL),
    ("assay", _LABEL), ("assay_ontology_term_id", _LABEL),
    ("cell_type", _LABEL), ("cell_type_ontology_term_id", _LABEL),
    ("development_stage", _LABEL), ("development_stage_ontology_term_id", _LABEL),
    ("disease", _LABEL), ("disease_ontology_term_id", _LABEL),
    ("donor_id", _LABEL), ("is_primary_data", pa.bool_()),
    ("observation_joinid", pa.large_string()),
    ("self_reported_ethnicity", _LABEL), ("self_reported_ethnicity_ontology_term_id", _LABEL),
    ("sex", _LABEL), ("sex_ontology_term_id", _LABEL), ("suspension_type", _LABEL),
    ("tissue", _LABEL), ("tissue_ontology_term_id", _LABEL), ("tissue_type", _LABEL),
    ("tissue_general", _LABEL), ("tissue_general_ontology_term_id", _LABEL),
    ("raw_sum", pa.float64()), ("nnz", pa.int64()), ("raw_mean_nnz", pa.float64()),
    ("raw_variance_nnz", pa.float64()), ("n_measured_vars", pa.int64()),
])
VAR_SCHEMA = pa.schema([
    ("soma_joinid", pa.int64()), ("feature_id", pa.large_string()),
    ("feature_name", pa.large_string()), ("feature_length", pa.int64()), ("nnz", pa.int64()),
    ("n_measured_obs", pa.int64()),
])
DATASETS_SCHEMA = pa.schema([
    ("soma_joinid", pa.int64()), ("citation", pa.large_string()),
    ("collection_id", pa.large_string()), ("collection_name", pa.large_string()),
    ("collection_doi", pa.large_string()), ("collection_doi_label", pa.large_string()),
    ("dataset_id", pa.large_string()), ("dataset_version_id", pa.large_string()),
    ("dataset_title", pa.large_string()), ("dataset_h5ad_path", pa.large_string()),
    ("dataset_total_cell_count", pa.int64()),
])

#: Where a source AnnData's obs labels are looked for, first match wins (each Census
#: column also matches itself); override with ``obs_columns=`` of write_local_census.
OBS_ALIASES: dict[str, tuple[str, ...]] = {
    "donor_id": ("donor",),
    "cell_type": ("celltype", "cell_types"),
}
#: Columns filled from the source (the rest are computed, or fixed as below).
SOURCE_COLUMNS = (*TERMS, *(f"{t}_ontology_term_id" for t in TERMS), "donor_id",
                  "suspension_type", "tissue_type")
FIXED = {"tissue_type": "tissue"}  # what every Census cell has unless the source says


def obs_labels(obs: pd.DataFrame, mapping: Mapping[str, str] | None) -> pd.DataFrame:
    """The Census label columns of a source's cells: its labels, ``"unknown"`` elsewhere.

    A column named in ``mapping`` is used where the source has it; otherwise a column of
    the Census's name or an alias (:data:`OBS_ALIASES`).
    """
    mapping = dict(mapping or {})
    unknown = [k for k in mapping if k not in SOURCE_COLUMNS]
    if unknown:
        msg = f"obs_columns keys must be Census obs columns ({SOURCE_COLUMNS}), not {unknown}."
        raise KeyError(msg)
    out = {}
    for col in SOURCE_COLUMNS:
        names = [*([mapping[col]] if col in mapping else []), col, *OBS_ALIASES.get(col, ())]
        found = next((n for n in names if n in obs.columns), None)
        default = FIXED.get(col, UNKNOWN)
        values = (obs[found].astype(object).where(obs[found].notna(), default).astype(str)
                  if found is not None else default)
        out[col] = pd.Series(values, index=obs.index, dtype=object)
    return pd.DataFrame(out, index=obs.index)


def summary_table(n_total: int, n_unique: int, donors: Mapping[str, int]) -> pd.DataFrame:
    rows = [("census_schema_version", CENSUS_SCHEMA_VERSION),
            ("census_build_date", datetime.date.today().isoformat()),
            ("dataset_schema_version", UNKNOWN),
            ("total_cell_count", str(n_total)), ("unique_cell_count", str(n_unique)),
            *((f"number_donors_{org}", str(donors.get(org, 0))) for org in ORGANISMS)]
    return pd.DataFrame(rows, columns=["label", "value"])


def organisms_table(experiments: list[str]) -> pd.DataFrame:
    return pd.DataFrame([(ORGANISMS[e][0], ORGANISMS[e][1], e) for e in experiments],
                        columns=["organism_ontology_term_id", "organism_label", "organism"])


def cell_counts_table(obs_by_exp: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Cells per organism, overall and by each label category (Census summary_cell_counts)."""
    rows = []
    for exp, obs in obs_by_exp.items():
        organism = ORGANISMS[exp][1]
        primary = obs["is_primary_data"].to_numpy()
        rows.append((organism, "all", "na", "na", len(obs), int(primary.sum())))
        for cat in ("cell_type", "assay", "tissue", "tissue_general", "disease",
                    "self_reported_ethnicity", "sex", "suspension_type"):
            term = (obs[f"{cat}_ontology_term_id"] if cat != "suspension_type"
                    else pd.Series("na", index=obs.index))
            keys = pd.DataFrame({"label": obs[cat].astype(str), "term": term.astype(str),
                                 "primary": primary})
            for (label, term_id), grp in keys.groupby(["label", "term"], sort=True):
                rows.append((organism, cat, label, term_id, len(grp),
                             int(grp["primary"].sum())))
    return pd.DataFrame(rows, columns=["organism", "category", "label", "ontology_term_id",
                                       "total_cell_count", "unique_cell_count"])


def to_table(df: pd.DataFrame, schema: pa.Schema | None = None) -> pa.Table:
    """``df`` as an arrow table with ``soma_joinid`` 0..n-1 (no pandas metadata: tiledbsoma
    cannot read dictionary columns back when the schema carries it)."""
    df = df.reset_index(drop=True)
    df.insert(0, "soma_joinid", range(len(df)))
    if schema is None:
        schema = pa.schema([("soma_joinid", pa.int64())] + [
            (c, pa.int64() if pd.api.types.is_integer_dtype(df[c]) else pa.large_string())
            for c in df.columns[1:]])
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False
                                ).replace_schema_metadata(None)
