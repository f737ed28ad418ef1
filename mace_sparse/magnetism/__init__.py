"""The per-atom magnetic-moment head: config, readout, loss, metrics, data handling, saved model, calculator."""
