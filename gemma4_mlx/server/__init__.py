"""An OpenAI- and Anthropic-compatible local HTTP server (`gemma4-mlx serve`).

`gemma4_mlx.server.app(model, tokenizer, model_name=...)` builds the FastAPI
application; `engine` owns the model on one thread."""

from gemma4_mlx.server.app import app

__all__ = ["app"]
