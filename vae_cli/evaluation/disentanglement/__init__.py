"""Disentanglement metrics of the reference study (Locatello et al. 2019), all on the encoder's
posterior means: one module per metric, the plug-in information estimates they share, the
small torch predictors, and the intervention sampling that uses a dataset's oracle."""
