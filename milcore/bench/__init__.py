"""Benchmarks run by ``milcore bench``: aggregators side by side (with torchmil peers), bank I/O, extraction.

Modules: ``peers`` (torchmil models behind the aggregator contract), ``memory`` (peak memory of a block),
``aggregators`` (cross-validated accuracy and cost of several aggregators on the same splits),
``report`` (Markdown table, ``bench.json``, plots), ``suites`` (synthetic, bloodmnist-bags, io, extract).
"""

#: Our aggregators benchmarked by default (the issue's six).
DEFAULT_MODELS = ("abmil", "amil", "transmil", "graphmil", "dsmil", "mean")
#: torchmil models with an adapter (``milcore.bench.peers``), by our aggregator name.
PEER_MODELS = ("abmil", "transmil", "dsmil", "clam_sb", "dtfd")
#: Peers run by default (torchmil's TransMIL trains at a few bags/s on CPU: opt in with ``--peers``).
DEFAULT_PEERS = ("abmil", "dsmil")
#: Prefix naming a peer's rows in logs.
PEER_PREFIX = "torchmil:"
