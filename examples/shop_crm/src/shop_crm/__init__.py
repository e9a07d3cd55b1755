"""An example project of a user of crisp-pipeline (not this repository): see its README."""
