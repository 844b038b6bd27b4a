"""The maths: the model (encoder, decoder, prior, likelihood), divergences, schedules, and
bounds.py, the only place their terms combine; rules.py, the only place combinations are
refused. Imports nothing about processes or files: parallel.py holds what data parallelism
changes in the maths (the global batch's noise sliced per rank, statistics summed over
ranks), and the training recipe supplies the rank and the sum."""
