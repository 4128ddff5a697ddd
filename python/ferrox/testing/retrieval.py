"""A retrieval corpus with planted label noise, for data-importance checks
(``ferrox.importance``) and the demo.

10,000 items in 4 Gaussian classes in 2-d (unit variance, centres 2.2
apart), 30% of the labels flipped to another class. Validation queries
(clean labels) retrieve their ``m`` nearest items; an item's utility for a
query is 1 if its label equals the query's, else 0; the model is a ``k``
nearest-neighbour vote. Needs scikit-learn (a test dependency).
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedNoise:
    x: np.ndarray          # [n, 2] item features
    y: np.ndarray          # [n] labels as stored (30% flipped)
    noisy: np.ndarray      # [n] bool: the label was flipped
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    retrieved: np.ndarray  # [n_val, m] int64 item ids, nearest first
    utility: np.ndarray    # [n_val, m] float64: 1 where the item's label is the query's
    k: int

    def accuracy(self, keep: np.ndarray):
        """(validation, test) accuracy of the k-NN vote over the kept items."""
        return (knn_accuracy(self.x[keep], self.y[keep], self.val_x, self.val_y, self.k),
                knn_accuracy(self.x[keep], self.y[keep], self.test_x, self.test_y, self.k))


def knn_accuracy(x, y, queries, labels, k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, algorithm="kd_tree").fit(x, y)
    return float(np.mean(clf.predict(queries) == labels))


def planted_noise(seed: int = 10, n: int = 10_000, noise: float = 0.3, n_val: int = 3000, n_test: int = 2000,
                  k: int = 5, m: int = 20) -> PlantedNoise:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    classes = 4
    centres = np.array([[0, 0], [2.2, 0], [0, 2.2], [2.2, 2.2]])

    def draw(size):
        y = rng.integers(0, classes, size)
        return centres[y] + rng.normal(size=(size, 2)), y

    x, y_clean = draw(n)
    noisy = rng.random(n) < noise
    y = np.where(noisy, (y_clean + rng.integers(1, classes, n)) % classes, y_clean)
    val_x, val_y = draw(n_val)
    test_x, test_y = draw(n_test)
    retrieved = NearestNeighbors(n_neighbors=m).fit(x).kneighbors(val_x, return_distance=False).astype(np.int64)
    utility = (y[retrieved] == val_y[:, None]).astype(np.float64)
    return PlantedNoise(x, y, noisy, val_x, val_y, test_x, test_y, retrieved, utility, k)
