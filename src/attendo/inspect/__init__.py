"""Looking inside a model: summaries, attention maps, next-token distributions, embeddings."""
