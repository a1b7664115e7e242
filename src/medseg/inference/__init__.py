"""Inference: the model bundle, Segmenter (Python API), TTA, ensembling, post-processing, export."""
