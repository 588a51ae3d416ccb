"""Sphinx helpers of the sclcm site: reading the tutorials, resolving sclcm's own names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docutils.nodes import Element, TextElement
    from nbformat import NotebookNode
    from sphinx.addnodes import pending_xref
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment


def read_tutorial(text: str) -> NotebookNode:
    """A percent-format script as a notebook, with the Python kernel and language named:
    jupytext leaves them out, and without them an unexecuted build cannot highlight."""
    import jupytext

    nb = jupytext.reads(text, fmt="py:percent")
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3",
                                          "language": "python"})
    nb.metadata.setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
    return nb


def resolve_short_names(app: Sphinx, env: BuildEnvironment, node: pending_xref,
                        contnode: TextElement) -> Element | None:
    """Link a name that sclcm's code writes without its module (``TokenBatch`` in a
    signature of ``sclcm.pp``, ``GeneReport.collapse`` in a docstring) to the one documented
    sclcm object it names; names that match none or several stay unresolved (and warn)."""
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = node["reftarget"].lstrip(".~")
    matches = domain.find_obj(env, node.get("py:module"), node.get("py:class"), target,
                              node["reftype"], 1)
    matches = [m for m in matches if m[0].startswith("sclcm.") and not m[1].aliased]
    if not matches and target.startswith("sclcm.") and target.count(".") > 1:
        # an attribute of a documented object (``sclcm.settings.device``): its page
        owner = target.rsplit(".", 1)[0]
        matches = [(owner, domain.objects[owner])] if owner in domain.objects else []
    if len(matches) != 1:
        return None
    name, obj = matches[0]
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


def setup(app: Sphinx) -> dict:
    app.connect("missing-reference", resolve_short_names)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
