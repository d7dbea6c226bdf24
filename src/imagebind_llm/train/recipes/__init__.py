"""Stage recipes: build data and model for a stage, then run the shared loop (`imagebind_llm.train.loop.train`)."""
