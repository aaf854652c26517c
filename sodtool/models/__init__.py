"""The networks: SOD-MTGAN's generator and discriminator, MTGAN loading for evaluation, and the
baseline detector families behind one predict contract (`sodtool.models.detectors`)."""
