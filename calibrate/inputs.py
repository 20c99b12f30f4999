"""What a calibration run reads: the embedder file and the datasets, embedded with it.

Shared by ``python -m calibrate`` (calibrate/cli/), its ``--check`` and the studies
(calibrate/studies/). A problem the user can fix is an :class:`InputError`, which every
command prints without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A problem the user can fix; printed without a traceback."""


def tail_level(fars: list[float], far_range: tuple[float, float]) -> float:
    """The shallowest tail level the normalisation maps: twice the loosest FAR reported."""
    return min(0.5, 2 * max(*fars, far_range[1]))


def model_file(path: str | None) -> Path:
    """The embedder .onnx to use: ``path``, or the shipped default when None."""
    if path is None:
        from embedding.defaults import require_default_model

        try:
            return require_default_model()
        except FileNotFoundError as err:
            raise InputError(str(err)) from err
    model = Path(path)
    if not model.is_file():
        raise InputError(f"model file not found: {model}; pass an exported embedder .onnx")
    return model


def embedded(spec: str, split: str, model: Path, device: str, progress: bool):
    """An EmbeddingSet: precomputed from .npz, or images embedded with the model."""
    from imagesets import load_embeddings, load_images

    try:
        if spec.endswith(".npz"):
            return _check_dim(load_embeddings(spec), spec, model)
        images = load_images(spec, split)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read dataset {spec!r}: {err}") from err
    return _embed(images, model, device, progress)


def _check_dim(embedded, spec: str, model: Path):
    """Precomputed embeddings must come from --model: at least their dimension must match."""
    from contracts import MetadataError, read_embedder_meta

    try:
        dim = read_embedder_meta(model).embedding_dim
    except (MetadataError, ValueError) as err:
        raise InputError(f"cannot read model {model}: {err}") from err
    if embedded.embeddings.shape[1] != dim:
        raise InputError(
            f"{spec} holds {embedded.embeddings.shape[1]}-d embeddings but {model} makes "
            f"{dim}-d ones: embed with that model, or pass the model that made them"
        )
    return embedded


def _embed(images, model: Path, device: str, progress: bool):
    from embedding import OnnxEmbedder
    from imagesets import EmbeddingSet

    try:
        embedder = OnnxEmbedder(model, device="auto" if device == "auto" else device)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"cannot load model {model}: {err}") from err
    vectors = embedder.embed_set(images, progress=f"embedding {images.name}" if progress else None)
    return EmbeddingSet(
        images.name, images.labels, images.class_names, images.tenants, images.tenant_names, vectors
    )
