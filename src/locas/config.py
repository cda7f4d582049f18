"""The names of a memory's options (how it is initialised, how its output scale is set), importable without
torch: the `locas` command lists them in its --help before loading anything heavy."""

# How `memorize` picks the neurons whose keys a new memory clones (locas.initialization).
MEMORY_INITS = ("highest", "lowest", "random_index", "random", "gradient")


# How a new memory's output scale tau is set, per (layer, slot). `paper` and `neuron` read the layer's mean
# backbone output-vector norm: under `paper` a memory of any width adds at most about one neuron's output
# vector, under `neuron` each slot is as strong as an average backbone neuron. Neither looks at how strongly the
# unit-norm keys fire on the model's own hidden states, which differs by model: on the embedded SmolLM2-135M
# (MLP inputs of norm ~3) `paper` lets the whole memory move an MLP output by ~0.2%, on Gemma-3-270M (inputs of
# norm ~15) by ~7%. `output` measures it on the text memorised: per layer, tau is set so that the memory with
# every value vector at full (unit) norm and aligned adds `output_ratio` times the layer's median MLP output
# norm (`initialization.measured_tau`). Every rule folds into the merged weights, so `to_dense` stays exact.
TAU_RULES = {
    "paper": "mean backbone output-vector norm / width",
    "neuron": "mean backbone output-vector norm",
    "output": "output_ratio x the layer's median MLP output norm / the memory's summed slot activations, "
    "measured on the memorized text",
}
