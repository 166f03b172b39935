from gemma4_mlx.cli import app

app(prog_name="gemma4-mlx")
