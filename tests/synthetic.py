"""Synthetic SAE-shaped activations shared by the plain tests (tests/*.py)."""
import torch


def sparse_activations(n_rows: int = 1024, # rows (tokens)
                       d_in: int = 16, # activation width
                       n_features: int = 32, # random unit directions the rows are built from
                       p_active: float = 0.1, # chance each direction is active in a row
                       seed: int = 0, # the same seed gives the same rows on every rank and process
                      ) -> torch.Tensor:
    "Sparse non-negative combinations of random unit directions plus an offset: `[n_rows, d_in]`."
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    coef = (torch.rand(n_rows, n_features, generator=g) < p_active) * torch.rand(n_rows, n_features, generator=g) * 3
    return coef @ directions + 0.5
