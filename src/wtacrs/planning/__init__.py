"""`wtacrs plan`: a GPU's peak memory and step time for a model, size and recipe, predicted
without the GPU from one training step traced on fake tensors (`tracer`), and the recipe
that fits a memory budget (`plan`)."""
