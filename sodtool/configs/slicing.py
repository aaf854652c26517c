"""Sliced inference's defaults (the code: sodtool.slicing), here so that the configs of the commands
that slice (`predict`, `eval`, `crop-rois`) read them without importing torch."""

DEFAULT_MERGE_IOS = 0.5
DEFAULT_OVERLAP = 0.2  # of the tile side, when a detector trained on tiles slices by default
