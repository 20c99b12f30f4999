"""The standard deep-metric-learning benchmarks, read from their published layouts.

Splits follow the usual open-world protocol (Song et al. 2016; Liu et al. 2016):

- CUB-200-2011: classes 1-100 train, 101-200 test (``images/<NNN.name>/*.jpg``).
- Cars-196: classes 1-98 train, 99-196 test (``cars_annos.mat`` + ``car_ims/``).
- Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt``; the super-class
  (bicycle, chair, ...) becomes the tenant.
- In-Shop: ``list_eval_partition.txt``; test = query + gallery; the garment category
  (e.g. ``WOMEN/Dresses``) becomes the tenant.

Nothing is downloaded: users point at files they already have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from imagesets.base import ImageSet, encode, single_tenant

Split = str  # "train" | "test"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: expected {path}")
    return path


def _image_set(
    name: str, paths: list[str], labels: list[str], tenants: list[str] | None
) -> ImageSet:
    if not paths:
        raise ValueError(f"{name}: no images in this split")
    codes, class_names = encode(labels)
    if tenants is None:
        tenant_codes, tenant_names = single_tenant(len(paths), name.split("-", maxsplit=1)[0])
    else:
        tenant_codes, tenant_names = encode(tenants)
    return ImageSet(name, codes, class_names, tenant_codes, tenant_names, paths=tuple(paths))


def load_cub(root: str | Path, split: Split) -> ImageSet:
    images = _need(Path(root) / "images", "CUB-200-2011")
    paths, labels = [], []
    for d in sorted(d for d in images.iterdir() if d.is_dir()):
        number = d.name.split(".", 1)[0]
        if not number.isdigit():
            raise ValueError(
                f"CUB-200-2011: class folder {d.name!r} should start with its number, e.g. 001."
            )
        if (int(number) <= 100) != (split == "train"):
            continue
        for f in sorted(d.glob("*.jpg")):
            paths.append(str(f))
            labels.append(d.name)
    return _image_set(f"cub-{split}", paths, labels, None)


def load_cars(root: str | Path, split: Split) -> ImageSet:
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError("reading cars_annos.mat needs scipy: pip install scipy") from err
    base = Path(root)
    annos = loadmat(_need(base / "cars_annos.mat", "Cars-196"))["annotations"][0]
    paths, labels = [], []
    for entry in annos:
        rel, cls = str(entry["relative_im_path"][0]), int(entry["class"][0][0])
        if (cls <= 98) == (split == "train"):
            paths.append(str(base / rel))
            labels.append(f"{cls:03d}")
    return _image_set(f"cars-{split}", paths, labels, None)


def load_sop(root: str | Path, split: Split) -> ImageSet:
    base = Path(root)
    listing = _need(
        base / f"Ebay_{'train' if split == 'train' else 'test'}.txt", "Stanford Online Products"
    )
    paths, labels, tenants = [], [], []
    for line in listing.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        _, class_id, _, rel = line.split()
        paths.append(str(base / rel))
        labels.append(class_id)
        tenants.append(rel.split("/")[0].removesuffix("_final"))
    return _image_set(f"sop-{split}", paths, labels, tenants)


def load_inshop(root: str | Path, split: Split) -> ImageSet:
    base = Path(root)
    listing = _need(base / "list_eval_partition.txt", "In-Shop")
    wanted = {"train"} if split == "train" else {"query", "gallery"}
    paths, labels, tenants, roles = [], [], [], []
    for line in listing.read_text().splitlines()[2:]:
        if not line.strip():
            continue
        rel, item, status = line.split()
        if status in wanted:
            parts = rel.split("/")
            paths.append(str(base / rel))
            labels.append(item)
            tenants.append("/".join(parts[1:3]))
            roles.append(status == "query")
    images = _image_set(f"inshop-{split}", paths, labels, tenants)
    return ImageSet(
        images.name,
        images.labels,
        images.class_names,
        images.tenants,
        images.tenant_names,
        paths=images.paths,
        extra={"is_query": np.array(roles, bool)},
    )


LOADERS: dict[str, Callable[[str | Path, Split], ImageSet]] = {
    "cub": load_cub,
    "cars": load_cars,
    "sop": load_sop,
    "inshop": load_inshop,
}
