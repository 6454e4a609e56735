"""The estimator contract's one shared check: methods that need ``fit`` say so instead of an AttributeError."""

from __future__ import annotations

from modelatlas.errors import AtlasError


class NotFittedError(AtlasError, AttributeError):
    """A method that needs fitted state was called on an estimator that was neither fitted nor loaded."""


def check_fitted(estimator: object, attribute: str) -> None:
    """Raise :class:`NotFittedError` naming the class unless ``estimator`` has the fitted ``attribute``."""
    if attribute not in vars(estimator):
        name = type(estimator).__name__
        raise NotFittedError(f"this {name} is not fitted yet (no {attribute}); call fit(...) first or load a saved one")
