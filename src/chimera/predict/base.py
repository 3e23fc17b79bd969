"""The predictor protocols, re-exported: the brain declares them (chimera.sched.predictors), predictors implement them."""

from chimera.sched.predictors import ConfidencePredictor, LengthPredictor

__all__ = ["ConfidencePredictor", "LengthPredictor"]
