"""What a Match does, independent of gRPC: decode, embed, search, decide.

``service`` (RetrievalService), ``model`` (the embedder bound to its calibration),
``imaging`` (untrusted image bytes), ``batcher`` (micro-batching), ``normalization``
(the served score map), ``threshold`` (a tenant's served threshold), ``decisions``
(recent decisions for Feedback), ``observer`` (the seam to monitoring).
"""
