"""medseg: medical image segmentation from native datasets to masks, fast on a CPU.

Two-line use::

    from medseg import Segmenter
    masks = Segmenter.load("lgg-unet").predict("kaggle_3m/TCGA_CS_4941_19960909")
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Segmenter", "create_model", "__version__"]


def __getattr__(name: str):  # lazy: importing medseg must stay cheap (no torch at import)
    if name == "Segmenter":
        from medseg.inference.segmenter import Segmenter

        return Segmenter
    if name == "create_model":
        from medseg.models import create_model

        return create_model
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
