"""Evaluations, one module each (e.g. `pg19`, whole-book language modelling); `distributed` shares one
evaluation's work among the processes of a `torchrun` launch."""
