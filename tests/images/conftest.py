import pytest

from harness.images import tiny_image


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory):
    """A private image cache for the session (the user's ~/.cache is not touched)."""
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="session")
def tiny(image_cache):
    return tiny_image(image_cache)
