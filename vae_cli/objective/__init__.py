"""The maths: the model (encoder, decoder, prior, likelihood), divergences, schedules, and
bounds.py, the only place their terms combine. Imports nothing about processes or files."""
