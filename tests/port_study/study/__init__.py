"""A sequence classification study: the study a port drops in where the Virgo study was.

Noisy 1-D sequences, each a sine of one of ``sequences.classes`` frequencies (``data``), a small
convolutional classifier trained with cross-entropy and SGD with momentum (``models``), accuracy as
its validation metric, and a per-experiment report of its own (``report``).
"""
