"""Which combinations of options the maths allows: every refusal of a combination, in one
table, each rule a short function that returns its one-line message (None: allowed).

``check`` runs them in order on the components a config chose, once, before they are put
together and before any work (config/build.py calls it). A component's own constructor
checks only its own values' ranges (beta >= 0, an estimator's name); what needs two
components to judge lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vae_cli.errors import UserError
from vae_cli.objective.divergences import (
    DIP,
    KL,
    Divergence,
    FactorVAE,
    TotalCorrelation,
)
from vae_cli.objective.likelihoods import Likelihood
from vae_cli.objective.posteriors import DiagonalGaussian, Posterior
from vae_cli.objective.priors import NormalPrior, Prior, VampPrior
from vae_cli.objective.schedules import Constant, Schedule

LABELLED = ("mnist, fashion_mnist, binarized_mnist, cifar10, shapes, dsprites, or folder "
            "with one sub-folder per class")


@dataclass
class Design:
    """The components a config chose, before they are composed into a model. ``prior`` is
    the configured one (model=hvae's prior of its top layer); ``nets`` has ``grid`` (the
    encoder's feature map, or None) and ``hierarchy`` (model=hvae's layers, or None)."""

    family: Posterior = field(default_factory=DiagonalGaussian)
    prior: Prior | None = None
    divergence: Divergence = field(default_factory=KL)
    schedule: Schedule = field(default_factory=Constant)
    likelihood: Likelihood | None = None
    nets: Any = None
    shape: tuple[int, ...] = (1, 1, 1)
    conditional: bool = False
    num_classes: int | None = None
    dataset: str = "this dataset"
    iw_samples: int = 1

    @property
    def hierarchy(self) -> bool:
        """A model of several stochastic layers (model=hvae or vdvae)."""
        return self.layered_model is not None

    @property
    def layered_model(self) -> str | None:
        if getattr(self.nets, "hierarchy", None) is not None:
            return "hvae"
        return "vdvae" if getattr(self.nets, "topdown", None) is not None else None

    @property
    def dense(self) -> bool:
        """Whether q(z|x) has a closed-form density anywhere (model=hvae's two layers, like a
        flow, only at their own samples)."""
        return self.family.closed_form and not self.hierarchy

    @property
    def posterior(self) -> str:
        """The posterior by its option's name, as the user chose it."""
        return f"gaussian with model={self.layered_model}" if self.hierarchy else \
            self.family.option

    @property
    def kl_prior(self) -> str:
        """The prior the divergence sees, by name: model=hvae composes its own."""
        names = {"hvae": "TwoLevelPrior", "vdvae": "LayeredPrior"}
        return names.get(self.layered_model, type(self.prior).__name__)

    @property
    def kl_closed_form(self) -> bool:
        """Whether KL(q || p) has a closed form against the prior the divergence sees."""
        return not self.hierarchy and self.prior is not None and self.prior.kl_closed_form()


def conditional_needs_labels(d: Design) -> str | None:
    if d.conditional and not d.num_classes:
        return (f"model.conditional=true needs class labels, and dataset={d.dataset} has "
                f"none; use a labelled dataset ({LABELLED})")
    return None


def quantiser_needs_a_feature_map(d: Design) -> str | None:
    if d.family.spatial and getattr(d.nets, "grid", None) is None:
        return (f"posterior={d.family.option} quantises the encoder's feature map: use "
                "model=conv or model=resnet")
    return None


def quantised_latents_are_unconditional(d: Design) -> str | None:
    if d.family.spatial and d.conditional:
        return (f"a quantised latent (posterior={d.family.option}) has no conditional form: "
                "model.conditional=false")
    return None


def hierarchy_needs_gaussian_layers(d: Design) -> str | None:
    if d.hierarchy and type(d.family) is not DiagonalGaussian:
        return (f"model={d.layered_model} has Gaussian layers; posterior={d.family.option} "
                "is not available for it, use posterior=gaussian (its logvar bounds apply "
                "to every layer)")
    return None


def topdown_has_its_own_prior(d: Design) -> str | None:
    if d.layered_model == "vdvae" and type(d.prior) is not NormalPrior:
        return (f"model=vdvae's prior is its own top-down layers, p(z_l | z_<l); "
                f"prior={type(d.prior).__name__} cannot replace it: use prior=normal")
    return None


def sequences_need_categorical(d: Design) -> str | None:
    if len(d.shape) == 1 and d.likelihood is not None and not d.likelihood.tokens:
        return (f"loss={d.likelihood.option} scores images; token sequences "
                "need loss=categorical")
    return None


def vamp_needs_densities(d: Design) -> str | None:
    if isinstance(d.prior, VampPrior) and not d.hierarchy and not d.dense:
        return (f"prior=vamp is a mixture of posteriors q(z|u_k), whose density "
                f"posterior={d.posterior} knows only at its own samples; use "
                "posterior=gaussian with prior=vamp, or another prior")
    return None


def codes_need_the_uniform_prior(d: Design) -> str | None:
    if d.family.discrete and not getattr(d.prior, "discrete", False):
        return (f"posterior={d.family.option} has a discrete latent, whose prior is "
                "prior=uniform (a learned prior over its codes is fitted after training: "
                "vae sample sampler=pixelcnn)")
    if getattr(d.prior, "discrete", False) and not d.family.discrete:
        return ("prior=uniform is the prior of a discrete latent (posterior=vq, fsq or gumbel), "
                f"not of posterior={d.family.option}")
    return None


def codes_need_kl(d: Design) -> str | None:
    if d.family.discrete and not isinstance(d.divergence, KL):
        return (f"posterior={d.family.option} has a discrete latent, whose KL to "
                "prior=uniform is exact: use divergence=kl")
    return None


# Why a divergence has no importance-weighted form (Divergence.iw_weight() is None).
NO_IW_FORM = {
    KL: "divergence.free_bits floors the KL of each latent dimension, which an "
        "importance-weighted bound does not have: set divergence.free_bits=0 or "
        "trainer.iw_samples=1",
    TotalCorrelation: "divergence=tc weights MI, TC and dimension-wise KL apart (alpha, "
                      "beta, gamma), which an importance-weighted bound cannot: use "
                      "divergence=kl with divergence.beta, or trainer.iw_samples=1",
    FactorVAE: "divergence=factorvae adds a discriminator's total-correlation estimate, "
               "which no importance-weighted bound has: use divergence=kl, or "
               "trainer.iw_samples=1",
    DIP: "divergence=dip adds a penalty on the batch's covariance, which no "
         "importance-weighted bound has: use divergence=kl, or trainer.iw_samples=1",
}


def iw_needs_a_kl_type_divergence(d: Design) -> str | None:
    if d.iw_samples == 1 or d.divergence.iw_weight() is not None:
        return None
    name = type(d.divergence).__name__.lower()
    return NO_IW_FORM.get(type(d.divergence), (
        f"trainer.iw_samples>1 needs a KL-type divergence; divergence={name} has no "
        "importance-weighted form: use divergence=kl or trainer.iw_samples=1"))


def iw_needs_a_density(d: Design) -> str | None:
    if d.iw_samples > 1 and d.likelihood is not None and not d.likelihood.density:
        return (f"loss={d.likelihood.option} is not a log-density, so there are no "
                "importance weights to average: use trainer.iw_samples=1")
    return None


def iw_needs_a_factor_schedule(d: Design) -> str | None:
    if d.iw_samples > 1 and not d.schedule.multiplicative:
        return (f"schedule={type(d.schedule).__name__.lower()} is not a factor on the "
                f"divergence, so trainer.iw_samples={d.iw_samples} cannot apply it; use "
                "schedule=constant, linear or cyclical, or trainer.iw_samples=1")
    return None


def iw_needs_densities_of_codes(d: Design) -> str | None:
    if d.iw_samples > 1 and d.family.discrete:
        return (f"posterior={d.family.option} trains on relaxed or straight-through "
                "samples, which have no importance weights: use trainer.iw_samples=1 (vae "
                "eval still reports the bound)")
    return None


def kl_estimator_fits_the_prior(d: Design) -> str | None:
    kl = d.divergence
    if not isinstance(kl, KL):
        return None
    if getattr(d.prior, "discrete", False):  # analytic over codes: relaxed z has no density
        if kl.estimator == "mc" or kl.free_bits:
            return ("a discrete latent's KL is exact: use divergence.estimator=auto and "
                    "divergence.free_bits=0")
        return None
    if kl.estimator == "analytic" and not d.kl_closed_form:
        return (f"divergence.estimator=analytic has no closed form against {d.kl_prior}; "
                "use divergence.estimator=mc or auto")
    if kl.free_bits and not (d.kl_closed_form and kl.estimator != "mc"):
        return ("divergence.free_bits needs a per-dimension KL, i.e. a diagonal Gaussian "
                "prior (prior=normal or learned) and estimator auto")
    return None


def kl_estimator_fits_the_posterior(d: Design) -> str | None:
    kl = d.divergence
    if not isinstance(kl, KL) or d.dense or d.family.discrete:
        return None
    if kl.estimator == "analytic" or kl.free_bits:
        return (f"posterior={d.posterior} has no closed-form or per-dimension KL; use "
                "divergence.estimator=auto (Monte Carlo) and divergence.free_bits=0")
    return None


def batch_divergences_need_densities(d: Design) -> str | None:
    """tc needs q(z_i|x_j) for every pair; dip the Gaussian's means and variances."""
    if d.dense:
        return None
    if isinstance(d.divergence, TotalCorrelation):
        return (f"divergence=tc needs q(z_i|x_j) for every pair in the batch, which "
                f"posterior={d.posterior} does not give (a flow's density is known at "
                "its own samples only); use posterior=gaussian")
    if isinstance(d.divergence, DIP):
        return (f"divergence=dip penalises the covariance of the encoder's Gaussian means "
                f"and variances, which posterior={d.posterior} pushes through a flow; "
                "use posterior=gaussian")
    return None


def dip_needs_the_normal_prior(d: Design) -> str | None:
    if isinstance(d.divergence, DIP) and (d.hierarchy or type(d.prior) is not NormalPrior):
        return (f"divergence=dip pulls the covariance of q(z) towards the identity, "
                f"prior=normal's, not {d.kl_prior}'s: use prior=normal")
    return None


# In the order they are judged: the first that objects is the one line the user reads.
RULES: tuple[Callable[[Design], str | None], ...] = (
    conditional_needs_labels,
    quantiser_needs_a_feature_map,
    quantised_latents_are_unconditional,
    hierarchy_needs_gaussian_layers,
    topdown_has_its_own_prior,
    sequences_need_categorical,
    vamp_needs_densities,
    codes_need_the_uniform_prior,
    codes_need_kl,
    iw_needs_a_kl_type_divergence,
    iw_needs_a_density,
    iw_needs_a_factor_schedule,
    iw_needs_densities_of_codes,
    dip_needs_the_normal_prior,
    kl_estimator_fits_the_prior,
    kl_estimator_fits_the_posterior,
    batch_divergences_need_densities,
)


def refusal(design: Design) -> str | None:
    """The first rule's objection to this design, or None when the maths allows it."""
    for rule in RULES:
        message = rule(design)
        if message:
            return message
    return None


def check(design: Design) -> None:
    message = refusal(design)
    if message:
        raise UserError(message)
