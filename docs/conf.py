"""Sphinx configuration of the sclcm site: ``make docs`` (``docs/_build/html``).

The tutorials (``tutorials/*.py``, Jupytext percent format, reached through the
``docs/tutorials`` link) are executed by myst-nb on every build; a failing cell fails the
build. Cross-references to anndata, scanpy, torch, numpy and pandas go through intersphinx
only with ``SCLCM_DOCS_INTERSPHINX=1``: their inventories live on those projects' sites,
which a build without network cannot reach.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import sclcm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))  # sclcm_docs: this site's own helpers

project = "sclcm"
author = "sclcm developers"
copyright = "sclcm developers"
release = sclcm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",  # MyST Markdown pages and the executed tutorials
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpy docstrings
    "sphinx.ext.viewcode",
    "sclcm_docs",
]
# .rst first: autosummary writes its generated pages with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".py": "myst-nb"}
exclude_patterns = ["_build", "_ext", "_templates", "conf.py", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
nitpicky = True  # every cross-reference must resolve

# --- MyST and the tutorials -------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

nb_custom_formats = {".py": ["sclcm_docs.read_tutorial", {}]}
nb_execution_mode = os.environ.get("SCLCM_DOCS_EXECUTE", "force")  # "off": text only
nb_execution_timeout = 900  # per cell; each tutorial runs in well under 3 minutes
nb_execution_raise_on_error = True  # a failing tutorial fails the build
nb_execution_in_temp = True  # the tutorials' outputs stay out of the source tree
nb_merge_streams = True
# The kernel inherits this environment: the tutorials read SCLCM_DATA and write their
# figures into TUTORIAL_OUT. The inline backend is what puts figures on the page, so a
# non-interactive backend chosen for the tests (MPLBACKEND=Agg) must not reach it.
os.environ.setdefault("SCLCM_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("TUTORIAL_OUT", str(ROOT / "docs" / "_build" / "tutorial_output"))
os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.pop("MPLBACKEND", None)
# tqdm.auto (sclcm's progress bars) warns in a kernel without ipywidgets ("IProgress not
# found"), about bars that the build turns off (SCLCM_PROGRESS=0): not tutorial output
os.environ["PYTHONWARNINGS"] = ",".join(
    w for w in [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]
    if w)
Path(os.environ["TUTORIAL_OUT"]).mkdir(parents=True, exist_ok=True)

# --- API reference ----------------------------------------------------------------------
# The pages are written anew by every build: a stale page of a name no longer in api.md
# would be a page outside every toctree (a warning, so a failed build).
shutil.rmtree(ROOT / "docs" / "generated", ignore_errors=True)
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # not Lightning's or torch's docs as sclcm's
autodoc_preserve_defaults = True  # show `key_added=None`, not an evaluated object
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False  # "Returns" as the docstring words it
napoleon_use_param = True
napoleon_use_ivar = False  # "Attributes" as attribute entries ("a, b" lists included)

# --- links to the libraries sclcm builds on ------------------------------------------
INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}
if os.environ.get("SCLCM_DOCS_INTERSPHINX", "0") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = INTERSPHINX
    intersphinx_timeout = 10
# Names of those libraries that signatures write without their module (``AnnData``,
# ``ndarray``: type-only imports), and all of them when the inventories are not loaded,
# cannot resolve; they are shown as text. An ignore applies only to a reference that did
# not resolve: with the inventories the others link. sclcm's own names must resolve.
_EXTERNAL = ["anndata", "scanpy", "numpy", "np", "pandas", "pd", "scipy", "torch", "matplotlib",
             "lightning", "L", "collections", "pathlib", "typing", "os", "datetime", "logging",
             "sparse", "tiledbsoma", "cellxgene_census", "safetensors", "huggingface_hub", "tqdm"]
_UNQUALIFIED = ["AnnData", "DataFrame", "Series", "Index", "ndarray", "Tensor", "Module", "Axes",
                "Figure", "Path", "PathLike", "Sequence", "Mapping", "Iterable", "Iterator",
                "Callable", "Generator", "ArrayLike", "DTypeLike", "spmatrix", "csr_matrix",
                "sparray", "csr_array", "device", "dtype", "Any", "Literal", "Self",
                "LightningModule", "LightningDataModule", "Callback", "Trainer",
                "IterableDataset", "DataLoader", "Dataset", "SOMAExperiment", "Annotation",
                "Colormap", "Logger", "Random", "Text",
                # builtins, which only the Python inventory has
                "int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "set",
                "frozenset", "object", "type", "slice", "range", "Exception", "ValueError",
                "KeyError", "TypeError", "FileNotFoundError", "RuntimeError"]
nitpick_ignore_regex = [
    ("py:.*", rf"(?:{'|'.join(_EXTERNAL)})(?:\..*)?"),
    ("py:class", rf"(?:{'|'.join(_UNQUALIFIED)})"),
    ("py:obj", r"(?:None|True|False|Any)"),
    # sclcm's type aliases (``Family = Literal[...]``) and classes of private modules in
    # public signatures (the config sections) have no page of their own
    ("py:class", r"Family|Stream|Targets|Verbosity"),
    ("py:class", r"sclcm(?:\.\w+)*\._\w+(?:\.\w+)*"),
    # Sphinx splits a string annotation with ``...`` (``dict[str, tuple[str, ...]]``)
    ("py:class", r"dict\[str|tuple\[str|\.\.\.\]+"),
]

# --- HTML -------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"sclcm {release}"
html_static_path: list[str] = []
html_theme_options = {"source_repository": "https://github.com/sclcm/sclcm",
                      "source_branch": "main", "source_directory": "docs/"}
pygments_style = "sphinx"
