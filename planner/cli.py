"""`ftplan` command line: a click group whose sub-commands are imported only when invoked.

Lazy loading keeps `ftplan estimate` fast: `ftplan --help` and `ftplan estimate` never import
the provider SDKs, paramiko or the SQLite store.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from ftplan.planner.errors import UserError

# name -> ("module:attribute", one-line help). Help lives here so `ftplan --help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("ftplan.planner.commands.estimate:estimate", "Peak GPU memory and training time of a fine-tuning job."),
    "plan": ("ftplan.planner.commands.plan:plan", "Cheapest instance that fits, across providers, with total cost."),
    "gpus": ("ftplan.planner.commands.gpus:gpus", "GPU types with memory and cheapest prices per provider."),
    "catalog": ("ftplan.planner.commands.catalog:catalog", "Show or refresh the pricing catalogs."),
    "init": ("ftplan.planner.commands.launch:init", "Write a commented ftplan.toml project file."),
    "launch": ("ftplan.planner.commands.launch:launch", "Provision, train, pull artifacts, tear down."),
    "attach": ("ftplan.planner.commands.launch:attach", "Re-attach to a live run."),
    "runs": ("ftplan.planner.commands.report:runs", "List recorded runs: estimated vs actual time and cost."),
    "report": ("ftplan.planner.commands.report:report", "One run, or totals by provider or month; --html writes a page."),
    "pull": ("ftplan.planner.commands.pull:pull", "Fetch a run's artifacts from its bucket, sha256 verified."),
    "gc": ("ftplan.planner.commands.launch:gc", "Find and terminate instances ftplan left behind."),
    "check": ("ftplan.planner.commands.check:check", "Which providers are usable here: extra, credential, a read-only call."),
}

# Pure arithmetic on shipped data, with a cold-start budget: no logging set-up unless asked for.
_NO_LOG_SETUP = ("estimate",)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise UserError(f"'ftplan {name}' is not available in this build") from None
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftplan")
@click.option("-v", "--verbose", count=True,
              help="Log provider requests, retries, SSH reconnects (-vv: the libraries' logs too).")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only.")
@click.pass_context
def cli(ctx, verbose, quiet):
    """ftplan: which GPU, for how long, at what price - and run it for me.

    Logs go to stderr: -v (or FTPLAN_LOG=debug) for every provider request, retry and SSH reconnect.
    Shell completion: eval "$(_FTPLAN_COMPLETE=bash_source ftplan)" (zsh_source, fish_source).
    """
    if verbose and quiet:
        raise UserError("pass either -v/--verbose or -q/--quiet, not both")
    if ctx.invoked_subcommand in _NO_LOG_SETUP and not (verbose or quiet or os.environ.get("FTPLAN_LOG")):
        return  # nothing on this path logs; importing `logging` would cost its cold start ~10 %
    from ftplan.planner.log_setup import configure_logging

    configure_logging(verbose=verbose, quiet=quiet)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Bad input -> one line on stderr and exit code 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="ftplan", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except UserError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.NoSuchOption as exc:
        hint = f" (did you mean {', '.join(exc.possibilities)}?)" if exc.possibilities else ""
        click.echo(f"error: no such option {exc.option_name}{hint}; see 'ftplan --help'", err=True)
        sys.exit(2)
    except click.exceptions.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "ftplan"
        click.echo(f"error: {_one_line(exc.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
