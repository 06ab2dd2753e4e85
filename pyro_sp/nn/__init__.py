# SPDX-License-Identifier: Apache-2.0
"""Declarative Bayesian networks: any ``torch.nn.Module`` made Bayesian."""

from . import layer_estimators, regenerated_noise
from .bayesian_module import BayesianModule, last_layer
from .likelihoods import categorical_likelihood, normal_likelihood
from .mean_field import MeanFieldVI

__all__ = ["BayesianModule", "MeanFieldVI", "categorical_likelihood", "last_layer", "layer_estimators",
           "normal_likelihood", "regenerated_noise"]
