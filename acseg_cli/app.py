"""The acseg application: commands registered explicitly, one module each."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from stages import __version__

from . import backbones, classify, conceptualize, extract, fit_acg, merge, process, refine, score
from .options import fail

# typer carries its own click: its exception classes, reached through the public BadParameter
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineUsageErrors(TyperGroup):
    """Click's usage errors (an unknown option, a value that is not one of the choices, a missing value) in
    acseg's form: one line on stderr, exit 2, said once under torchrun, instead of usage, hint and error on
    four lines."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # plain `acseg`: the help, as click gives it
                e.show()
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else "acseg"
            msg = e.format_message().replace("Value error, ", "").rstrip(".")
            try:
                fail(f"{msg}; see '{where} --help'", 2)
            except typer.Exit as done:
                sys.exit(done.exit_code)
        except _ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="acseg",
    help="Unsupervised semantic segmentation by adaptive conceptualization (ACSeg), as Unix-style stages.\n\nEach "
    "stage reads a file and prints the path of the file it wrote, so stages chain in pipes:\n\n  acseg extract "
    "imgs/ -o feats.h5 | acseg conceptualize | acseg classify --n-classes 11 -o out/",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        sys.stdout.write(f"acseg {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """acseg: ACSeg as Unix-style stages."""


app.command("extract")(extract.command)
app.command("fit-acg")(fit_acg.command)
app.command("conceptualize")(conceptualize.command)
app.command("classify")(classify.command)
app.command("refine")(refine.command)
app.command("merge")(merge.command)
app.command("score")(score.command)
app.command("backbones")(backbones.command)


def main() -> None:
    process.setup()
    try:
        app()
    except SystemExit as e:
        process.leave(e.code)
        raise
