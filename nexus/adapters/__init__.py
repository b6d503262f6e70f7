"""Backend adapters: the contract (``base``) and the built-in OpenAI-compatible one (``generic``)."""
