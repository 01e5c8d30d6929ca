"""`python -m lorakit.train ...`: the train commands alone, for torchrun before they are part of `lorakit`."""

import typer

from lorakit.train.commands import register

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
register(app)
app(prog_name="lorakit")
