"""Compression under an accuracy budget: a search over composed methods (channel
pruning, sparsity, k-means sharing or INT8), judged on a validation split, returning the
Pareto front and the chosen deployable file (``netshrink compress``)."""

from netshrink import make_verb_package
from netshrink.compress.candidates import Candidate, candidate_stages
from netshrink.compress.options import CompressConfig
from netshrink.compress.search import CHOSEN_DIR, CompressResult, Trial, compress

__all__ = ["CHOSEN_DIR", "Candidate", "CompressConfig", "CompressResult", "Trial",
           "candidate_stages", "compress"]

make_verb_package(__name__)
