"""The stages: one module per command, each a function taking one frozen config dataclass.

Only `sodtool.cli` imports these modules, and no stage imports another: what two stages share
lives in a lower room (see ARCHITECTURE.md).
"""
