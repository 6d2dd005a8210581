"""What a tagging is asked for: the tagger folder, how many tags, from which score, on what.

`top_k` and `threshold` decide what is stored; the soft prompt's own `top_k` and `threshold`
(recipe settings) choose among the stored tags, so the stored ones are a generous superset.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import (
    ACTIVATIONS,
    DEFAULT_BATCH,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    TaggerError,
    check_tagging,
    read_config,
)


@dataclass
class TagOptions:
    tagger: str
    top_k: int = DEFAULT_TOP_K
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = DEFAULT_BATCH
    activation: str = "auto"
    device: str | None = None
    dtype: str | None = None

    def check(self) -> None:
        """Numbers first, then the folder's config files: nothing heavy is loaded."""
        check_tagging(self.top_k, self.threshold, self.batch_size)
        if self.activation not in ACTIVATIONS:
            raise TaggerError(
                f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        from .feature_rule import FeatureRule  # torch: only once the numbers are right

        config = read_config(self.tagger)
        FeatureRule.from_folder(self.tagger)
        if self.top_k > len(config["id2label"]):
            raise TaggerError(
                f"--top-k {self.top_k} is more than the tagger's {len(config['id2label'])} labels"
            )

    def load(self):
        """The loaded tags.tagger.Tagger."""
        from .tagger import Tagger

        self.check()
        return Tagger(self.tagger, self.device, self.dtype, self.activation, self.top_k)

    def matches(self, provenance: dict | None, tagger) -> bool:
        """Whether a set's recorded tagging is this one (same weights, rule and settings)."""
        if not provenance:
            return False
        want = {**tagger.describe(), "top_k": self.top_k, "threshold": self.threshold}
        same = ("fingerprint", "activation", "feature_rule", "labels", "top_k", "threshold")
        return all(provenance.get(k) == want[k] for k in same)
