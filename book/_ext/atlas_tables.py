"""Sphinx extension: number glued tables as tables, not as figures.

MyST-NB's ``glue:figure`` wraps every glued output in a figure node, so a glued DataFrame is counted
with the figures and ``{numref}`` calls it "Fig. N". This re-types each glued figure whose label starts
with ``tbl-`` as a ``glued_table``: Sphinx then numbers it among the tables, its caption reads
"Table N", and references to it say "Table N". It renders exactly as a figure does.
"""

from docutils import nodes
from docutils.transforms import Transform

TABLE_PREFIX = "tbl-"


class glued_table(nodes.figure):  # noqa: N801 (docutils node classes are lower case)
    """A figure node that holds a table; Sphinx enumerates it as a table."""


class RetypeGluedTables(Transform):
    """Turn figures labelled ``tbl-…`` into ``glued_table`` nodes before Sphinx records labels."""

    default_priority = 200  # after the directives have run, before the domains read the labels

    def apply(self, **kwargs) -> None:
        for figure in list(self.document.findall(nodes.figure)):
            if type(figure) is nodes.figure and any(i.startswith(TABLE_PREFIX) for i in figure["ids"]):
                # Swapping the class keeps the node in place: document.ids, parents and refs stay valid.
                figure.__class__ = glued_table


def _visit(translator, node) -> None:
    translator.visit_figure(node)


def _depart(translator, node) -> None:
    translator.depart_figure(node)


def setup(app):
    app.add_enumerable_node(glued_table, "table", html=(_visit, _depart))
    app.add_transform(RetypeGluedTables)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
