"""The calibration engine: exact FAR, thresholds, TAR and OPIS from streamed pair counts.

``evaluate`` (the entry point, also ``calibrate.evaluate``) runs ``prepare`` (checked,
normalised inputs), the blocked score ``sweep`` (``device``: CPU or faiss GPU;
``distributed``: shards over torch.distributed ranks), the counting ``passes`` over it
(``tail``: the impostor tail histogram; ``grids``: counts on the OPIS threshold grid),
``assemble`` (counts -> ``results``) and the class ``bootstrap``; ``progress`` draws the
bars. It imports nothing else of calibrate but the OPIS math (calibrate.consistency).
"""
