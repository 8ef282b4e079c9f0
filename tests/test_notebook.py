"""notebooks/quickstart.ipynb runs top to bottom on a quickstart workdir, so it never rots."""

import json

import pytest
from helpers import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(quickstart_workdir, cache_dir):
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "code" and "WORKDIR =" in first.source
    first.source = f"WORKDIR = {str(quickstart_workdir)!r}\nCACHE_DIR = {str(cache_dir)!r}"
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.count("<img") == 4 and "truth:" in html
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| llava_stage2 | test |" in markdown and "| blind | test |" in markdown
    saved = json.loads(NOTEBOOK.read_text())  # the notebook on disk keeps its default first cell
    assert "".join(saved["cells"][0]["source"]).startswith("# The quickstart workdir")
