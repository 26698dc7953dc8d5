import pytest

from seedbed.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def default_dataset() -> Dataset:
    """The Shakespeare corpus with the bytes tokenizer (downloaded once into the cache)."""
    return load_dataset("default")
