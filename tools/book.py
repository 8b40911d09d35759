"""Execute chapters in place, so that they are committed with what they printed and drew, and stamp each with a
hash of its code cells; `--check` names the chapters whose outputs are missing or older than their code.

    python tools/book.py                        # every chapter in nbs/
    python tools/book.py nbs/08_engine.ipynb    # some of them
    python tools/book.py --check                # exit 1 and say which chapters need a run

The kernel gets matplotlib's inline backend, so that `plt.show()` puts every figure into the notebook even when the
shell says MPLBACKEND=Agg. Cells tagged `skip-execution` (the command-line entry points) are not run.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
STAMP = "nanochat"  # notebook metadata key kept by nbdev-clean (pyproject.toml: allowed_metadata_keys)


def code_hash(nb) -> str:
    "SHA-256 of the code cells' sources, in order: what the outputs were produced from."
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


def staleness(path: Path) -> str | None:
    "Why the chapter at `path` needs `make book` (one sentence), or None if its outputs match its code."
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get(STAMP, {}).get("code_sha256")
    run = f"run `python tools/book.py {path.relative_to(REPO) if path.is_relative_to(REPO) else path}`"
    if stamp is None:
        return f"{path.name} was never executed by `make book`: {run}."
    if stamp != code_hash(nb):
        return f"{path.name}'s code changed after it was executed: {run}."
    if not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"):
        return f"{path.name} has no outputs: {run}."
    return None


def execute(path: Path, timeout: int = 1200):
    "Run the chapter top to bottom in its folder, stamp it, write it back and clean its metadata (outputs kept)."
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata[STAMP] = {"code_sha256": code_hash(nb)}
    nbformat.write(nb, path)
    subprocess.run([str(Path(sys.executable).parent / "nbdev-clean"), "--fname", str(path)], cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters to execute (default: all of nbs/)")
    parser.add_argument("--check", action="store_true", help="only say which chapters need executing")
    args = parser.parse_args()
    paths = [p.resolve() for p in args.notebooks] or sorted((REPO / "nbs").glob("*.ipynb"))
    if args.check:
        problems = [p for p in map(staleness, paths) if p]
        print("\n".join(problems) or f"all {len(paths)} chapters have fresh outputs")
        sys.exit(1 if problems else 0)
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"executed {path.relative_to(REPO)} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
