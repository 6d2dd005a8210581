"""Audio event tags for the clips of a shard set (GAMA-IT's soft prompt hint): the tagger, run on
the stored features (`Tagger`), and the tagging of a shard set (tag_set.py). docs/FORMAT.md
describes the stored tags.

`Tagger` is imported on first use: the command line reads the tagging options (checks.py,
options.py) without importing torch and transformers.
"""

from .checks import TaggerError, check_tagging

__all__ = ["Tagger", "TaggerError", "check_tagging"]


def __getattr__(name: str):
    if name == "Tagger":
        from .tagger import Tagger

        return Tagger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
