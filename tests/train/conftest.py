import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """One data.cache_dir for every test here that reads the built-in corpus, so that it is tokenized once."""
    return str(tmp_path_factory.mktemp("corpus_cache"))


def real_corpus_overrides(tmp_path, cache: str) -> list[str]:
    """The tiny preset on the built-in corpus, capped at 2 MB of sources, writing under tmp_path."""
    return [f"train.out_dir={tmp_path}/run", f"data.cache_dir={cache}", "data.default_corpus_max_bytes=2000000"]
