"""Evaluation results as a JSON file and a table on the terminal."""

from __future__ import annotations

SHOWN = ("split", "examples", "epoch", "likelihood", "loss", "recon", "div", "nelbo", "bpd",
         "nll_token", "ppl", "nll_iwae", "bpd_iwae", "nll_token_iwae", "ppl_iwae", "iw_samples",
         "active_units", "kl_per_dim",
         # disentanglement metrics, each followed by its settings (evaluation/disentanglement)
         "beta_vae", "beta_vae_train", "beta_vae_settings",
         "factor_vae", "factor_vae_train", "factor_vae_active_dims", "factor_vae_settings",
         "mig", "mig_per_factor", "mig_settings",
         "sap", "sap_per_factor", "sap_settings",
         "dci_disentanglement", "dci_completeness", "dci_informativeness",
         "dci_informativeness_per_factor", "dci_settings",
         "modularity", "modularity_settings", "disentanglement_skipped",
         "fd_sampler", "fd_samples", "fd_features")


def _fmt(v) -> str:
    if isinstance(v, float):  # settings such as a tolerance of 1e-8 keep their digits
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.3g}"
    if isinstance(v, list):
        return " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v)
    if isinstance(v, dict):
        return "  ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def table(result: dict) -> str:
    rows = [(k, _fmt(result[k])) for k in SHOWN if k in result]
    rows += [(k, _fmt(v)) for k, v in result.items()
             if k not in SHOWN and isinstance(v, float) and k not in ("checkpoint",)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
