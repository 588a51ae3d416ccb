"""Sphinx configuration: ``pip install -e .[docs] && sphinx-build docs docs/_build``."""

project = "sclcm"
author = "sclcm developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.autosummary", "sphinx_autodoc_typehints"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence"]
autosummary_generate = True
napoleon_numpy_docstring = True
html_theme = "furo"
exclude_patterns = ["_build"]
