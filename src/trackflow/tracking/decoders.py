"""Direction decoders of the tracker (deterministic, sampled).

Placeholder of this branch: the tracker branch fills this module (``make_direction_decoder``, the decoder
classes); only the vocabulary the tracking parser and options need is here.
"""

ALGOS = ("det", "prob")
