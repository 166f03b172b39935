from .cli import app

app(prog_name="gemma4-mlx")
