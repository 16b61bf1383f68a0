"""Turning logits into text: the sampler, the generation loop, beam search."""
