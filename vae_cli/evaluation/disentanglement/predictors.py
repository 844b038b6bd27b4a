"""The small predictors the metrics fit, in torch (float64, full batch, deterministic):
multinomial logistic regression (BetaVAE score, SAP) and the lasso (DCI)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation; a constant column keeps std 1, so it
    standardises to zeros instead of dividing by zero."""
    mean, std = x.mean(0), x.std(0, unbiased=False)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [F, C], on standardised features
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [F], the training features' standardisation
    std: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x.double() - self.mean) / self.std) @ self.weight + self.bias).argmax(1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).double().mean()) if len(y) else float("nan")


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0,
                 max_iter: int = 100) -> LogisticRegression:
    """Multinomial logistic regression of labels y (0..classes-1) on features x [N, F],
    standardised with their own mean and std. Minimises c * sum of cross-entropies +
    ||W||^2 / 2 (scikit-learn's C convention; the bias is not penalised), by L-BFGS with a
    strong-Wolfe line search from zero weights, for at most ``max_iter`` iterations."""
    x = x.detach().cpu().double()
    y = y.detach().cpu()
    mean, std = standardize(x)
    xs = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-12)
    penalty = 1 / (2 * c * len(x))  # the same minimiser as c * sum + ||W||^2 / 2, well scaled

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(weight.detach(), bias.detach(), mean, std)


def lasso(x: torch.Tensor, y: torch.Tensor, alpha: float, max_iter: int = 1000,
          tol: float = 1e-8) -> torch.Tensor:
    """Lasso weights [D, K] for every column of y [N, K] on x [N, D] (both centred), each
    column its own problem min_w ||y - x w||^2 / (2N) + alpha * ||w||_1. Cyclic coordinate
    descent on the Gram matrix (Friedman et al. 2010) from zero, until no weight moves by more
    than ``tol`` in a sweep or after ``max_iter`` sweeps."""
    x, y = x.detach().cpu().double(), y.detach().cpu().double()
    n = len(x)
    gram, xy = x.T @ x / n, x.T @ y / n
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        moved = 0.0
        for j in range(x.shape[1]):
            if gram[j, j] <= 0:  # a constant column explains nothing
                continue
            rho = xy[j] - gram[j] @ w + gram[j, j] * w[j]
            new = torch.sign(rho) * (rho.abs() - alpha).clamp_min(0) / gram[j, j]
            moved = max(moved, float((new - w[j]).abs().max()))
            w[j] = new
        if moved < tol:
            break
    return w
