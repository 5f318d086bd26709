"""Workload images: recipes, local builds from Debian packages or files, and pushes per mode.

The runner's path through this package::

    built = build_layers(RECIPES["python"])             # cached by recipe hash
    pushed = push_image(built, "10.213.0.2:5000", "python", "legacy", "legacy")
    pushed.ref, pushed.manifest_digest, pushed.layers   # what the registry now holds

``tiny_image()`` is a seconds-fast three-layer image (busybox, a whiteout, an opaque dir) for
tests. ``import_image("docker-archive:app.tar")`` and ``build_containerfile(path)`` make the
same kind of image from any other source (harness.images.source). Recipes also carry what the
runner needs to run a workload: ``run_cmd``, ``stdin``,
``ready_line``, ``expected_output``, ``timeout``.
"""

from collections.abc import Callable
from pathlib import Path

from harness.images.build import (
    BuiltImage,
    BuiltLayer,
    ImageBuildError,
    build_layers,
    cached_image,
    default_cache_dir,
)
from harness.images.push import (
    MODES,
    LayerRefused,
    ModeUnsupported,
    PushedImage,
    PushedLayer,
    PushError,
    inspect_pushed,
    oci_layout,
    push_image,
)
from harness.images.recipes import RECIPES, FileSpec, LayerSpec, Recipe, recipe_hash
from harness.images.source import (
    ContainerfileSource,
    ImageSource,
    ImageSourceError,
    build_containerfile,
    import_image,
)
from harness.images.tiny import TINY_OUTPUT, tiny_image, tiny_recipe


def build_image(
    spec: Recipe | ImageSource | ContainerfileSource,
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> BuiltImage:
    """A workload's image, built or imported (cached): a recipe, an image reference or a
    Containerfile."""
    if isinstance(spec, Recipe):
        return build_layers(spec, cache_dir, progress=progress)
    return spec.build(cache_dir, progress=progress)


def find_recipe(name: str) -> Recipe:
    """A workload recipe by name (``tiny`` included); ``KeyError`` names the known ones."""
    if name == "tiny":
        return tiny_recipe()
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join([*RECIPES, "tiny"])
        raise KeyError(f"unknown workload image {name!r} (known: {known})") from None


__all__ = [
    "MODES",
    "RECIPES",
    "TINY_OUTPUT",
    "BuiltImage",
    "BuiltLayer",
    "ContainerfileSource",
    "FileSpec",
    "ImageBuildError",
    "ImageSource",
    "ImageSourceError",
    "LayerRefused",
    "LayerSpec",
    "ModeUnsupported",
    "PushError",
    "PushedImage",
    "PushedLayer",
    "Recipe",
    "build_containerfile",
    "build_image",
    "build_layers",
    "cached_image",
    "default_cache_dir",
    "find_recipe",
    "import_image",
    "inspect_pushed",
    "oci_layout",
    "push_image",
    "recipe_hash",
    "tiny_image",
    "tiny_recipe",
]
