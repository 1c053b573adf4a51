"""What every benchmark command shares: its common options, checks of the data files it
reads, and the tail every run ends with (table on stdout, JSON and PNG where asked).
Each benchmark module defines its own ``command``; ``aniserve.cli`` finds them by name."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import click

from aniserve.bench.budget import Budget
from aniserve.embedded import DEFAULT_MODEL

model_option = click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or path.")


def json_option(help: str = "Write the results as JSON."):
    return click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help=help)


def plot_option(help: str = "Write a PNG of the results."):
    return click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None, help=help)


def seeds_option(f):
    return click.option("--seeds", default=None, type=int, help="Number of seeds (default 3, or 1 with --quick).")(f)


def budget_option(f):
    return click.option(
        "--budget",
        "budget_items",
        multiple=True,
        metavar="KEY=JSON",
        help="Override a budget field (aniserve.bench.budget.Budget), e.g. --budget transfer_lr=1e-4.",
    )(f)


def workdir_option(default_name: str):
    return click.option(
        "--workdir",
        type=click.Path(file_okay=False),
        default=None,
        help=f"Where the trained models go (default $ANISERVE_CACHE/{default_name}).",
    )


def test_option(help: str = "Held-out test set with the high level."):
    return click.option(
        "--test", "test_path", default="data/qm-test.h5", show_default=True, type=click.Path(dir_okay=False), help=help
    )


def parse_items(items) -> dict:
    """KEY=JSON items as a dict (a value that is not JSON stays text)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def budget_from(preset: Budget, seeds: int | None, items) -> Budget:
    """The preset budget with the seed count and --budget overrides applied."""
    try:
        return preset.with_changes(seeds, parse_items(items))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--budget") from None


def data_files(*options) -> None:
    """Each (option, path, …): the files must exist; the defaults (data/…) are the
    repository's, which a wheel install does not have, and the message says so."""
    for option, *paths in options:
        for path in paths:
            if not pathlib.Path(path).is_file():
                raise click.BadParameter(
                    f"{path} does not exist.  The benchmark data sets (data/qm-train.h5, data/qm-test.h5, …) come "
                    f"with the aniserve repository, not the wheel: run from a clone's root, or give files made with "
                    f"`aniserve data generate` (data/README.md in the repository)",
                    param_hint=option,
                )


def report_kept(folder) -> None:
    from aniserve.cache import size_mb

    click.echo(f"models kept in {folder} ({size_mb(folder):.0f} MB; `aniserve cache clear` removes them)", err=True)


def finish(
    result: dict, table: str, json_out=None, plot_out=None, plot: Callable[[dict, str], None] | None = None
) -> None:
    """The end of every benchmark run: the table on stdout, the JSON and the plot where asked."""
    click.echo(table)
    if json_out:
        pathlib.Path(json_out).write_text(json.dumps(result, indent=1))
    if plot_out and plot is not None:
        plot(result, plot_out)
