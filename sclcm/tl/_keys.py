"""The keys a tool writes, all derived from one ``key_added``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingKeys:
    """Where :func:`sclcm.tl.embed` writes: cells in ``obsm``, genes in ``varm``, record
    in ``uns``.

    Examples
    --------
    >>> EmbeddingKeys.of("X_sclcm")
    EmbeddingKeys(obsm='X_sclcm', varm='sclcm_gene_embedding', uns='sclcm')
    >>> EmbeddingKeys.of("gf")
    EmbeddingKeys(obsm='gf', varm='gf_gene_embedding', uns='gf')
    """

    obsm: str
    varm: str
    uns: str

    @classmethod
    def of(cls, key_added: str) -> EmbeddingKeys:
        if not isinstance(key_added, str) or key_added in ("", "X_"):
            msg = f"key_added must be a non-empty string such as 'X_sclcm', not {key_added!r}."
            raise ValueError(msg)
        # scanpy's obsm keys start with "X_"; the other keys use the name without it
        base = key_added.removeprefix("X_")
        return cls(obsm=key_added, varm=f"{base}_gene_embedding", uns=base)
