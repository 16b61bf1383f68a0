"""Looking inside a model: what the playground, the inspection routes and the CLI views show.

summary.py (`attendo info`), datapath.py (the data path with the model's numbers), tokens.py
(readable token strings), stages.py (the sampler's stages of one step), attention.py (one layer's
attention maps, all three families), geometry.py (embeddings, their angles and PCA), plots.py
(the PNGs), commands.py (`attendo distribution`, `attention`, `embed-plot`).
"""
