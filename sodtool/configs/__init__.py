"""Each stage's config dataclass and presets, one module per stage, importing no torch.

The stages (`sodtool.stages.<stage>`) import their config from here; `sodtool.cli` builds each
command's options from the config's fields (`sodtool.options`), so `sodtool --help` reads every
default and help text without importing torch.
"""
