"""The image-level Gaussian (models.components.density) against scikit-learn's LedoitWolf."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from sklearn.covariance import LedoitWolf

from core.errors import InputError
from models.components.density import GaussianDensity, ledoit_wolf


@pytest.mark.parametrize("n, d", [(10, 32), (40, 8), (200, 16), (5, 512)])
def test_ledoit_wolf_equals_sklearn(n, d):
    rng = np.random.default_rng(n * d)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    covariance, shrinkage = ledoit_wolf(x)
    reference = LedoitWolf().fit(x)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(covariance, reference.covariance_, rtol=1e-9, atol=1e-12)


def test_mahalanobis_equals_sklearn_on_new_points():
    rng = np.random.default_rng(7)
    train, test = rng.standard_normal((30, 12)), rng.standard_normal((9, 12)) * 2
    density = GaussianDensity.fit(train)
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(test))  # sklearn returns squared distances
    np.testing.assert_allclose(density.score(test), expected, rtol=1e-8)


def test_hand_computed_case():
    # two points (0,0), (2,0): S = [[1,0],[0,0]], mu = 1/2, delta = 1/4, sum ||x_i||^4 = 2,
    # spread = (2 - 2*1) / (2*4) = 0 -> no shrinkage; covariance = S (singular: pinv)
    covariance, shrinkage = ledoit_wolf(np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert shrinkage == 0.0
    np.testing.assert_array_equal(covariance, [[1.0, 0.0], [0.0, 0.0]])
    density = GaussianDensity.fit(np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert density.score(np.array([[3.0, 0.0]]))[0] == pytest.approx(2.0)  # |3 - 1| / sqrt(1)


def test_layer_equals_numpy_score():
    rng = np.random.default_rng(3)
    density = GaussianDensity.fit(rng.standard_normal((50, 16)))
    test = rng.standard_normal((6, 16)).astype(np.float32)
    got = density.layer()(paddle.to_tensor(test)).numpy()
    np.testing.assert_allclose(got, density.score(test), rtol=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize("embeddings, message", [
    (np.zeros((1, 4)), "a Gaussian needs at least 2 images"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "not finite (NaN or infinity)"),
])
def test_refuses_too_few_or_non_finite(embeddings, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GaussianDensity.fit(embeddings, what="train embeddings")
