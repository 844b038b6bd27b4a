"""objective/rules.py: each rule refuses its combination with its one line and lets the
nearest allowed one through; every rule of the table is exercised here, in-process, on the
real components (the CLI's own refusals are end-to-end in test_design_space)."""

from types import SimpleNamespace

import pytest
from torch import nn

from vae_cli.errors import UserError
from vae_cli.objective import rules
from vae_cli.objective.discrete import GumbelSoftmax, UniformPrior, VectorQuantizer
from vae_cli.objective.divergences import DIP, KL, MMD, FactorVAE, TotalCorrelation
from vae_cli.objective.likelihoods import Bernoulli, Categorical
from vae_cli.objective.perceptual import Perceptual
from vae_cli.objective.posteriors import DiagonalGaussian, Planar
from vae_cli.objective.priors import LearnedPrior, MixturePrior, NormalPrior, VampPrior
from vae_cli.objective.rules import Design
from vae_cli.objective.schedules import Capacity, Linear

D = 4
FLAT = SimpleNamespace(grid=None, hierarchy=None)
MAP = SimpleNamespace(grid=(2, 2), hierarchy=None)
HVAE = SimpleNamespace(grid=None, hierarchy=nn.Linear(1, 1))
VDVAE = SimpleNamespace(grid=None, hierarchy=None, topdown=nn.Linear(1, 1))


def VQ():  # noqa: N802 (reads as the class it builds)
    return VectorQuantizer(codes=8, latent_dim=D)


def normal():
    return NormalPrior(latent_dim=D)


def vamp():
    return VampPrior(components=3, shape=(1, 4, 4), latent_dim=D)


# (rule, a design it refuses, a fragment of its message, the nearest design it allows)
CASES = [
    (rules.conditional_needs_labels,
     Design(prior=normal(), conditional=True, dataset="shapes"), "needs class labels",
     Design(prior=normal(), conditional=True, num_classes=3)),
    (rules.quantiser_needs_a_feature_map,
     Design(VQ(), UniformPrior(latent_dim=D), nets=FLAT),
     "model=conv or model=resnet",
     Design(VQ(), UniformPrior(latent_dim=D), nets=MAP)),
    (rules.quantised_latents_are_unconditional,
     Design(VQ(), UniformPrior(latent_dim=D), nets=MAP, conditional=True,
            num_classes=3), "no conditional form",
     Design(VQ(), UniformPrior(latent_dim=D), nets=MAP)),
    (rules.hierarchy_needs_gaussian_layers,
     Design(Planar(steps=2), normal(), nets=HVAE), "model=hvae has Gaussian layers",
     Design(DiagonalGaussian(), normal(), nets=HVAE)),
    (rules.sequences_need_categorical,
     Design(prior=normal(), likelihood=Bernoulli(), shape=(12,)), "loss=bernoulli scores images",
     Design(prior=normal(), likelihood=Categorical(classes=20), shape=(12,))),
    (rules.vamp_needs_densities,
     Design(Planar(steps=2), vamp(), KL(estimator="mc")), "prior=vamp",
     Design(DiagonalGaussian(), vamp())),
    (rules.codes_need_the_uniform_prior,
     Design(GumbelSoftmax(classes=2, latent_dim=D), normal()), "prior=uniform",
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D))),
    (rules.codes_need_the_uniform_prior,
     Design(DiagonalGaussian(), UniformPrior(latent_dim=D)), "not of posterior=gaussian",
     Design(DiagonalGaussian(), normal())),
    (rules.codes_need_kl,
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D), MMD()),
     "use divergence=kl",
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D), KL())),
    (rules.iw_needs_a_kl_type_divergence,
     Design(prior=normal(), divergence=MMD(), iw_samples=5), "divergence=mmd has no",
     Design(prior=normal(), divergence=MMD(), iw_samples=1)),
    (rules.iw_needs_a_kl_type_divergence,
     Design(prior=normal(), divergence=KL(free_bits=0.5), iw_samples=5), "free_bits",
     Design(prior=normal(), divergence=KL(), iw_samples=5)),
    (rules.iw_needs_a_kl_type_divergence,
     Design(prior=normal(), divergence=FactorVAE(latent_dim=D), iw_samples=5),
     "divergence=factorvae",
     Design(prior=normal(), divergence=FactorVAE(latent_dim=D), iw_samples=1)),
    (rules.iw_needs_a_factor_schedule,
     Design(prior=normal(), schedule=Capacity(), iw_samples=5), "schedule=capacity",
     Design(prior=normal(), schedule=Linear(), iw_samples=5)),
    (rules.iw_needs_a_density,
     Design(prior=normal(), likelihood=Perceptual(perceptual_weight=0, disc_weight=0,
                                                  shape=(1, 4, 4)), iw_samples=5),
     "loss=perceptual is not a log-density",
     Design(prior=normal(), likelihood=Perceptual(perceptual_weight=0, disc_weight=0,
                                                  shape=(1, 4, 4)))),
    (rules.iw_needs_densities_of_codes,
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D), iw_samples=5),
     "no importance weights",
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D))),
    (rules.dip_needs_the_normal_prior,
     Design(prior=LearnedPrior(latent_dim=D), divergence=DIP()), "use prior=normal",
     Design(prior=normal(), divergence=DIP())),
    (rules.dip_needs_the_normal_prior,
     Design(prior=normal(), divergence=DIP(), nets=HVAE), "not TwoLevelPrior's",
     Design(prior=normal(), divergence=DIP(), nets=FLAT)),
    (rules.kl_estimator_fits_the_prior,
     Design(prior=MixturePrior(components=2, latent_dim=D), divergence=KL(estimator="analytic")),
     "no closed form against MixturePrior",
     Design(prior=MixturePrior(components=2, latent_dim=D), divergence=KL(estimator="auto"))),
    (rules.kl_estimator_fits_the_prior,
     Design(prior=vamp(), divergence=KL(free_bits=0.5)), "per-dimension KL",
     Design(prior=LearnedPrior(latent_dim=D), divergence=KL(free_bits=0.5))),
    (rules.kl_estimator_fits_the_prior,
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D),
            KL(estimator="mc")), "a discrete latent's KL is exact",
     Design(GumbelSoftmax(classes=2, latent_dim=D), UniformPrior(latent_dim=D), KL())),
    (rules.kl_estimator_fits_the_prior,
     Design(prior=normal(), divergence=KL(estimator="analytic"), nets=HVAE),
     "against TwoLevelPrior",
     Design(prior=normal(), divergence=KL(estimator="analytic"), nets=FLAT)),
    (rules.kl_estimator_fits_the_posterior,
     Design(Planar(steps=2), normal(), KL(estimator="analytic")), "posterior=planar has no",
     Design(Planar(steps=2), normal(), KL(estimator="auto"))),
    (rules.batch_divergences_need_densities,
     Design(Planar(steps=2), normal(), TotalCorrelation(dataset_size=10)), "divergence=tc",
     Design(DiagonalGaussian(), normal(), TotalCorrelation(dataset_size=10))),
    (rules.batch_divergences_need_densities,
     Design(DiagonalGaussian(), normal(), TotalCorrelation(dataset_size=10), nets=HVAE),
     "posterior=gaussian with model=hvae",
     Design(DiagonalGaussian(), normal(), TotalCorrelation(dataset_size=10), nets=FLAT)),
    (rules.topdown_has_its_own_prior,
     Design(prior=vamp(), nets=VDVAE), "model=vdvae's prior is its own top-down layers",
     Design(prior=normal(), nets=VDVAE)),
    (rules.batch_divergences_need_densities,
     Design(Planar(steps=2), normal(), DIP()), "divergence=dip",
     Design(DiagonalGaussian(), normal(), DIP())),
]


@pytest.mark.parametrize(("rule", "refused", "fragment", "allowed"), CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_refuses_its_combination_in_one_line_and_allows_the_nearest(
        rule, refused, fragment, allowed):
    message = rule(refused)
    assert message and fragment in message and "\n" not in message, message
    assert rule(allowed) is None
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        rules.check(refused)  # no earlier rule of the table speaks instead
    rules.check(allowed)


def test_every_rule_of_the_table_is_exercised():
    assert {c[0] for c in CASES} == set(rules.RULES)
