"""Put the default model's ONNX export in $BATCHMASK_CACHE_DIR, as ``batchmask run`` looks it up.

Uses batchmask's own cache code (:func:`batchmask.inference.backends.cached_onnx`), so the image's entry is
found by the same key and layout a run reads. ``--cached-only``: succeed only when the entry is
already there (no Keras needed to check); exit 1 otherwise. ``--prune``: remove the cache's
other entries (exports of earlier default models), so a build context carries only this one.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cached-only", action="store_true")
    ap.add_argument("--prune", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="export_onnx: %(message)s")
    from batchmask.inference import default_model_dir
    from batchmask.inference.backends import cache_dir, cached_onnx, onnxruntime_installed

    if not onnxruntime_installed():
        print("export_onnx: onnxruntime is not installed", file=sys.stderr)
        return 1
    if args.cached_only:
        import importlib.util

        if importlib.util.find_spec("keras") is None:  # then cached_onnx() cannot export: it only looks
            logging.getLogger("batchmask.inference.backends").setLevel(logging.ERROR)
    found = cached_onnx(default_model_dir())
    if found is None:
        print(f"export_onnx: no ONNX export of the default model in {cache_dir()}", file=sys.stderr)
        return 1
    path, record = found
    if args.prune:  # an entry is the files named <key>.* beside the ONNX file
        for other in path.parent.iterdir():
            if other.is_file() and not other.name.startswith(f"{path.stem}."):
                other.unlink()
    if args.cached_only and not record.get("cached"):
        print(f"export_onnx: {path} was exported now, not found in the cache", file=sys.stderr)
        return 1
    print(f"export_onnx: {path} ({'cached' if record.get('cached') else 'exported now'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
