"""Execute the notebooks with this interpreter's kernel and save them with their outputs (they are committed so
that they render on a code host). Nothing here runs a model: the notebooks only open saved artifacts.

    python notebooks/execute.py                         # all notebooks, in place
    python notebooks/execute.py notebooks/search.ipynb  # one
    PYRAMIDINFER_NB_STUDY=runs/quick/smollm2_b0.3.optuna.db python notebooks/execute.py notebooks/search.ipynb

The environment variables the parameter cells read (PYRAMIDINFER_NB_SCHEDULE, _STUDY, _EVAL, _BENCH) pass through.
tests/test_notebooks.py uses `execute` too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
KERNEL = "python3"


@contextlib.contextmanager
def environment(env: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, with None, remove) environment variables for the kernel, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def kernel_here() -> Iterator[None]:
    """A `python3` kernel spec that runs this interpreter (first on JUPYTER_PATH), so that the notebooks see the
    same packages as the caller whatever kernels are installed elsewhere."""
    with tempfile.TemporaryDirectory(prefix="pyramidinfer-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": "Python 3 (ipykernel)", "language": "python"})
        )
        paths = [tmp, *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
        with environment({"JUPYTER_PATH": os.pathsep.join(paths)}):
            yield


def execute(
    path: str | Path,
    env: Mapping[str, str | None] | None = None,
    save_to: str | Path | None = None,
    timeout: int = 120,
):
    """Run every cell of the notebook (a failing cell raises nbclient's CellExecutionError) in its own folder,
    with the Agg backend; return the executed notebook and write it to `save_to` when given."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with kernel_here(), environment({"MPLBACKEND": "Agg", **(env or {})}):
        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    if save_to is not None:
        nbformat.write(nb, save_to)
    return nb


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or NOTEBOOKS
    for p in paths:
        execute(p, save_to=p)
        print(f"executed {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
