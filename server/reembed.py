"""``python -m server.reembed``: re-embed every gallery of a data dir with a new model.

The server does this by itself on start (and on Reload), but an operator may want it
done ahead, offline, e.g. before switching a deployment to a new model, so the
server starts without the wait. Items keep their source image bytes, so nothing
but the data dir and the model is needed. Run it while no server uses the data dir.

    python -m server.reembed --data-dir out/server --model new.onnx
Prints one JSON line per tenant; exit 2 when the model or data dir is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embedding import OnnxEmbedder
from embedding.defaults import DEFAULT_MODEL
from server.matching.imaging import ImageLimits, to_model_input
from server.storage.faiss.tenants import TenantRegistry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m server.reembed", description=__doc__.splitlines()[0]
    )
    p.add_argument("--data-dir", type=Path, default=Path("out/server"))
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if not (args.data_dir / "tenants").is_dir():
        print(f"error: {args.data_dir} holds no galleries (no tenants/ folder)", file=sys.stderr)
        return 2
    try:
        embedder = OnnxEmbedder(args.model, device=args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = ImageLimits()

    def embed(images: list[bytes]):
        import numpy as np

        batch = np.stack([to_model_input(i, embedder.meta, limits) for i in images])
        return np.concatenate([embedder.run(batch[s : s + 256]) for s in range(0, len(batch), 256)])

    registry = TenantRegistry(args.data_dir, embedder.dim, embedder.sha256, embed)
    registry.load_all()  # opening re-embeds stale items and snapshots them
    for tenant in registry.all():
        line = {"tenant": tenant.name, "items": tenant.gallery.size}
        print(json.dumps(line | {"reembedded": tenant.gallery.reembedded}))
    registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
