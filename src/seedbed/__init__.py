"""seedbed: build, train, shrink and measure tiny language models."""

__version__ = "0.1.0"


def load(path):
    """Load a trained run folder; returns a LoadedModel with .generate, .stream and .evaluate."""
    from seedbed.runs import load as load_run

    return load_run(path)


__all__ = ["load", "__version__"]
