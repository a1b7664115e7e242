"""Data layer: native readers (formats/), the prepared-dataset format, splits, sampling."""
